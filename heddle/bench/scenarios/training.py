"""Training throughput of the example GPT under any Trainer configuration.

    heddle bench training --nproc 2 --config '{}' --config '{"label": "clip", "max_grad_norm": 1.0}'
    heddle bench training --nproc 8 --config cfg.json --d-model 1024 --layers 16 --precision bf16

Each ``--config`` (JSON text or a JSON file) is one case: :class:`heddle.TrainerConfig` fields and
feature sections, plus ``"label"`` (the row's name) and ``"model"`` (GPTConfig overrides). One
row per case, compared side by side in one process group, with torchtitan's metrics read after
``--warmup`` untimed steps over ``--trials`` timed steps:

- ``tokens_per_s_per_device`` = global tokens per step / median step time / devices;
- step-time breakdown: ``comm_s``: the step's CommLedger records replayed alone
  (:mod:`heddle.bench.comm_replay`: what the communication costs unoverlapped), ``comm_mb_per_step``
  (ledger bytes sent by rank 0), ``checkpoint_stall_s``: time inside the checkpoint plugin's hooks
  (what the training loop waits for), ``compute_s`` = step - comm - stall (a lower bound on the
  compute when communication overlaps it);
- ``peak_memory_mb``: CUDA max allocated (reset per case) or, on CPU, the process's peak RSS;
- ``mfu`` = (6 N + 12 L H Q T) tokens/s/device / peak (:mod:`heddle.bench.flops`; A100, H100,
  H200 table, or ``--peak-tflops``).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import fields

import torch
import torch.distributed as dist
import torch.nn.functional as F

import heddle
import heddle.dist as hd
from heddle.bench import flops
from heddle.bench.comm_replay import Replayer
from heddle.bench.scenario import BenchContext, Scenario, summarize
from heddle.data import ByteCorpus, WindowSampler
from heddle.models import GPT, GPTConfig

# Feature configs the quick set adds when their plugin module exists (2 processes).
QUICK_FEATURE_CONFIGS = [
    ("heddle.plugins.sequence_parallel", {"label": "ulysses sp2", "sequence_parallel": {"sp_size": 2}}),
    ("heddle.plugins.moe", {"label": "moe fssdp 4 experts", "moe": {"num_experts": 4}}),
    ("heddle.plugins.compression", {"label": "compression topk 1%", "compression": {
        "compressor": "topk:0.01", "feedback": "ef", "start_iter": 2}}),
    ("heddle.plugins.checkpoint", {"label": "checkpoint every step", "checkpoint": {
        "directory": "@tmp", "every": 1}}),
]
TMP_DIRECTORY = "@tmp"  # in a config: a fresh temporary directory for this case, removed after it
PLUGIN_HOOKS = ("prepare_batch", "reduce_gradients", "before_optimizer_step", "after_optimizer_step")


def parse_config(text: str) -> dict:
    """``--config`` value: JSON text, or the path of a JSON file."""
    source = text
    if not text.strip().startswith("{") and os.path.exists(text):
        with open(text) as f:
            source = f.read()
    try:
        value = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {text!r} is neither JSON nor a JSON file ({e})") from None
    if not isinstance(value, dict):
        raise ValueError(f"--config {text!r} must be a JSON object, got {type(value).__name__}")
    return value


def split_config(config: dict) -> tuple[str, dict, dict]:
    """(label, GPTConfig overrides, TrainerConfig kwargs); ValueError on unknown keys."""
    config = dict(config)
    model = config.pop("model", {}) or {}
    label = config.pop("label", None)
    valid = {f.name for f in fields(heddle.TrainerConfig)}
    unknown = sorted(set(config) - valid)
    if unknown:
        raise ValueError(f"--config: unknown TrainerConfig field(s) {unknown}; valid: "
                         f"{sorted(valid | {'label', 'model'})}")
    bad_model = sorted(set(model) - {f.name for f in fields(GPTConfig)})
    if bad_model:
        raise ValueError(f"--config model: unknown GPTConfig field(s) {bad_model}")
    if label is None:
        label = json.dumps({**config, **({"model": model} if model else {})}, sort_keys=True,
                           separators=(",", ":")) if config or model else "default"
    return str(label), model, config


class _HookTimer:
    """Wraps every plugin's per-step hooks to accumulate the seconds spent in each plugin."""

    def __init__(self, plugins):
        self.seconds = {p.name: 0.0 for p in plugins}
        for plugin in plugins:
            for hook in PLUGIN_HOOKS:
                setattr(plugin, hook, self._wrap(plugin.name, getattr(plugin, hook)))

    def _wrap(self, name, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - start
        return timed

    def take(self) -> dict[str, float]:
        out, self.seconds = self.seconds, {k: 0.0 for k in self.seconds}
        return out


def peak_memory_mb(device: torch.device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20, "cuda_max_allocated"
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (peak / 2**20 if sys.platform == "darwin" else peak / 1024), "process_peak_rss"


class Training(Scenario):
    name = "training"
    help = "example GPT under TrainerConfig(s): tokens/s/device, compute/comm/checkpoint split, memory, MFU"

    @property
    def quick_args(self) -> list[str]:
        """Small model; plain DDP plus one config per feature plugin that is installed."""
        args = ["--d-model", "64", "--layers", "2", "--heads", "4", "--seq-len", "64", "--batch-size", "8",
                "--warmup", "3", "--trials", "8"]
        for config in [{"label": "ddp"}, {"label": "ddp accum2 clip", "grad_accum_steps": 2, "max_grad_norm": 1.0}] + [
                config for module, config in QUICK_FEATURE_CONFIGS if importlib.util.find_spec(module)]:
            args += ["--config", json.dumps(config)]
        return args

    def add_options(self, parser):
        parser.add_argument("--config", action="append", default=None,
                            help="TrainerConfig as JSON or a JSON file (+ 'label', 'model'); repeat to compare")
        parser.add_argument("--d-model", type=int, default=128)
        parser.add_argument("--layers", type=int, default=4)
        parser.add_argument("--heads", type=int, default=4)
        parser.add_argument("--seq-len", type=int, default=128)
        parser.add_argument("--batch-size", type=int, default=8, help="global sequences per optimizer step")
        parser.add_argument("--lr", type=float, default=3e-3)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                            help="bf16: autocast the forward (MFU uses the bf16 peak)")
        parser.add_argument("--peak-tflops", type=float, default=None,
                            help="device peak for MFU when it is not in the table (TFLOP/s)")
        parser.add_argument("--replays", type=int, default=3, help="timed replays of a step's communication")

    def cases(self, options) -> list[dict]:
        configs = options.config or ["{}"]
        out = []
        for text in configs:
            label, model, trainer = split_config(parse_config(text))
            out.append({"config": label, "model": model, "trainer": trainer})
        return out

    def check_options(self, options) -> None:
        """Every --config, through heddle.config (unknown keys name their section), before workers."""
        from heddle.config import load_config

        for case in self.cases(options):
            load_config(case["trainer"])
            self._model_config(options, case["model"])

    def _model_config(self, options, overrides: dict) -> GPTConfig:
        base = dict(d_model=options.d_model, n_layers=options.layers, n_heads=options.heads,
                    max_seq_len=options.seq_len)
        return GPTConfig(**{**base, **overrides})

    def run(self, ctx: BenchContext, options) -> list[dict]:
        for name in ("batch_size", "seq_len", "replays"):
            if getattr(options, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}={getattr(options, name)} must be >= 1")
        corpus = ByteCorpus.stdlib(max_bytes=1 << 20)
        rows = []
        for case in self.cases(options):
            rows.append(self._run_case(ctx, options, corpus, case))
            r = rows[-1]
            ctx.log(f"training {case['config']}: {r['tokens_per_s_per_device']:,.0f} tokens/s/device, "
                    f"step {r['step_time_s'] * 1e3:.1f} ms (comm {r['comm_s'] * 1e3:.1f} ms, "
                    f"stall {r['checkpoint_stall_s'] * 1e3:.1f} ms)")
        for r in rows:  # side by side: throughput relative to the first config (the baseline)
            r["vs_first"] = r["tokens_per_s_per_device"] / rows[0]["tokens_per_s_per_device"]
        return rows

    @staticmethod
    def _with_tmp(ctx: BenchContext, trainer_config: dict) -> tuple[dict, str | None]:
        """Replace "@tmp" directories by one fresh directory made by rank 0 (same on every rank)."""
        text = json.dumps(trainer_config)
        if f'"{TMP_DIRECTORY}"' not in text:
            return trainer_config, None
        shared = [tempfile.mkdtemp(prefix="heddle-bench-") if ctx.rank == 0 else None]
        if ctx.world_size > 1:
            dist.broadcast_object_list(shared, src=0, group=ctx.group)
        return json.loads(text.replace(f'"{TMP_DIRECTORY}"', json.dumps(shared[0]))), shared[0]

    def _run_case(self, ctx: BenchContext, options, corpus: ByteCorpus, case: dict) -> dict:
        trainer_kwargs, tmp = self._with_tmp(ctx, case["trainer"])
        try:
            return self._measure(ctx, options, corpus, case, trainer_kwargs)
        finally:
            if tmp is not None:
                if ctx.world_size > 1:
                    dist.barrier(group=ctx.group)
                if ctx.rank == 0:
                    shutil.rmtree(tmp, ignore_errors=True)

    def _measure(self, ctx: BenchContext, options, corpus: ByteCorpus, case: dict, trainer_kwargs: dict) -> dict:
        cfg = self._model_config(options, case["model"])
        torch.manual_seed(options.seed)
        model = GPT(cfg).to(ctx.device)
        optimizer = lambda params: torch.optim.AdamW(params, lr=options.lr, weight_decay=0.0)  # noqa: E731
        tconfig = heddle.TrainerConfig(**{**trainer_kwargs, "progress": False})
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        trainer = heddle.Trainer(model, optimizer, config=tconfig, group=ctx.group)
        hooks = _HookTimer(trainer.plugins)
        accum = tconfig.grad_accum_steps
        # the Trainer adds the MoE load-balancing loss (moe.aux_loss_weight) in backward
        dp_rank, dp_size = trainer.layout.dp_rank, trainer.layout.dp_size
        sampler = trainer.track("sampler", WindowSampler(corpus.train, options.seq_len, options.batch_size * accum,
                                                         seed=options.seed, dp_rank=dp_rank, dp_size=dp_size))
        autocast = (torch.autocast(ctx.device.type, dtype=torch.bfloat16) if options.precision == "bf16"
                    else contextlib.nullcontext())
        state: dict = {}

        def one_step():
            x, y = sampler.next()
            fwd_bwd = 0.0
            for mx, my in zip(x.chunk(accum), y.chunk(accum)):
                start = time.perf_counter()
                batch = trainer.prepare_batch({"tokens": mx.to(ctx.device), "targets": my.to(ctx.device)})
                with autocast:
                    logits = trainer.model(batch["tokens"], position_ids=batch.get("position_ids"),
                                           cu_seqlens=batch.get("cu_seqlens"))
                targets = batch["targets"]
                loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                                       reduction="sum")
                trainer.backward(loss, num_tokens=(targets != -100).sum())
                fwd_bwd += time.perf_counter() - start
            start = time.perf_counter()
            state["metrics"] = trainer.step()
            state["fwd_bwd"], state["opt"] = fwd_bwd, time.perf_counter() - start

        for _ in range(options.warmup):
            ctx.timed(one_step)
        hooks.take()
        times, fwd_bwd, opt, stalls, tokens = [], [], [], [], []
        with hd.CommLedger() as ledger:
            for _ in range(options.trials):
                mark = len(ledger.records)
                times.append(ctx.timed(one_step))
                fwd_bwd.append(state["fwd_bwd"])
                opt.append(state["opt"])
                stalls.append(hooks.take().get("checkpoint", 0.0))
                tokens.append(state["metrics"]["tokens"])
                step_records = ledger.records[mark:]
        trainer.close()
        comm_s, replayed = self._replay(ctx, options, step_records)
        stats = summarize(times)
        local = torch.tensor([summarize(fwd_bwd)["median_s"], summarize(opt)["median_s"],
                              summarize(stalls)["median_s"], peak_memory_mb(ctx.device)[0]], dtype=torch.float64)
        if ctx.world_size > 1:  # the slowest rank's phases and the largest memory
            hd.all_reduce(local, op=hd.ReduceOp.MAX, group=ctx.group)
        fwd_bwd_s, opt_s, stall_s, peak_mb = (float(v) for v in local)
        tokens_per_step = sorted(tokens)[len(tokens) // 2]
        tokens_per_s = tokens_per_step / stats["median_s"]
        per_device = tokens_per_s / ctx.world_size
        embed = model.embed.weight.numel()
        fpt = flops.gpt_flops_per_token(params_no_embedding=sum(p.numel() for p in model.parameters()) - embed,
                                        n_layers=cfg.n_layers, n_heads=cfg.n_heads,
                                        head_dim=cfg.d_model // cfg.n_heads, seq_len=options.seq_len)
        peak, peak_source = self._peak(ctx, options)
        mfu = flops.mfu(fpt, per_device, peak)
        return {
            "config": case["config"], "trainer_config_json": json.dumps(case["trainer"], sort_keys=True),
            "model_config_json": json.dumps(vars(cfg), sort_keys=True),
            "params": sum(p.numel() for p in model.parameters()), "seq_len": options.seq_len,
            "global_batch": options.batch_size * accum, "precision": options.precision,
            "tokens_per_step": tokens_per_step, "tokens_per_s": tokens_per_s, "tokens_per_s_per_device": per_device,
            "step_time_s": stats["median_s"], "compute_s": max(0.0, stats["median_s"] - comm_s - stall_s),
            "comm_s": comm_s, "comm_mb_per_step": sum(r.bytes_sent for r in step_records) / 1e6,
            "comm_calls_per_step": len(step_records), "comm_replayed_calls": replayed,
            "comm_ops_json": json.dumps(self._ops(step_records), sort_keys=True),
            "checkpoint_stall_s": stall_s, "fwd_bwd_s": fwd_bwd_s, "trainer_step_s": opt_s,
            "peak_memory_mb": peak_mb, "peak_memory_kind": peak_memory_mb(ctx.device)[1],
            "flops_per_token": fpt, "peak_flops": peak, "peak_source": peak_source, "mfu": mfu,
            "final_loss": state["metrics"]["loss"], **stats}

    @staticmethod
    def _ops(records) -> dict:
        out: dict = {}
        for r in records:
            out.setdefault(r.op, [0, 0])
            out[r.op][0] += 1
            out[r.op][1] += r.bytes_sent
        return {op: {"calls": c, "bytes_sent": b} for op, (c, b) in out.items()}

    @staticmethod
    def _replay(ctx: BenchContext, options, records) -> tuple[float, int]:
        """Median seconds of the step's communication replayed alone (rank 0's records)."""
        if ctx.world_size == 1:
            return 0.0, 0
        shared = [records]
        dist.broadcast_object_list(shared, src=0, group=ctx.group)  # every rank replays rank 0's sequence
        replay = Replayer(shared[0], world_size=ctx.world_size, device=ctx.device)
        if not len(replay):
            return 0.0, 0
        replay()  # warm-up: first use of buffers and subgroups
        return summarize([ctx.timed(replay) for _ in range(options.replays)])["median_s"], len(replay)

    @staticmethod
    def _peak(ctx: BenchContext, options) -> tuple[float | None, str]:
        if options.peak_tflops is not None:
            if not options.peak_tflops > 0:
                raise ValueError(f"--peak-tflops={options.peak_tflops} must be positive")
            return options.peak_tflops * 1e12, "--peak-tflops"
        if ctx.device.type != "cuda":
            return None, "unknown device (cpu): give --peak-tflops for MFU"
        name = torch.cuda.get_device_name(ctx.device)
        dtype = options.precision if options.precision == "bf16" else (
            "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32")
        peak = flops.peak_flops(name, dtype)
        return peak, (f"table: {name} {dtype}" if peak else f"{name} not in the peak table: give --peak-tflops")


SCENARIO = Training()
