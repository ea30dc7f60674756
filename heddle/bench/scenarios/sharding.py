"""Sharded data parallelism side by side: heddle DDP, heddle FSDP2, DeepSpeed ZeRO-2 and ZeRO-3.

    heddle bench sharding --nproc 2 [--d-model 384 --layers 6] [--impls ddp,fsdp,zero2,zero3]
    heddle run -n 2 benchmarks/sharding.py          # the same, with the goals printed

The four train the same GPT (same initial weights, same global batches split over the ranks,
AdamW, fp32), one case after the other in one process group: heddle through
``Trainer(data_parallel="ddp" | "fsdp")``, DeepSpeed through ``deepspeed.initialize`` with ZeRO
stage 2 or 3 and its defaults (gloo, ``torch_adam``, the working CPU config of
notes/sharding.md). What each row measures:

- ``state_mb``: per rank, the distinct tensor storages (``untyped_storage().nbytes()``, shared
  storage counted once) of the parameters (``DTensor.to_local()``, ``p.ds_tensor``), gradients
  (``p.grad``, DeepSpeed's gradient partitions and buffers), optimizer state (``optimizer.state``)
  and, for DeepSpeed, every other tensor its ZeRO optimizer holds (fp32 master partitions,
  flat buffers), read after the backward of a step (gradients present); max over ranks.
  Not visible from Python, so not counted: DDP's C++ gradient buckets (which makes DDP look
  smaller, not FSDP2).
- ``peak_rss_over_start_mb``: how far the process's resident set rose while the case was built
  and ran its warm-up and measuring steps (``VmHWM``, reset through /proc/self/clear_refs at the
  case's start, minus the RSS then); ``peak_rss_mb`` is that peak itself, which includes the
  cases built before it (they stay alive for the timed part); max over ranks.
- ``tokens_per_s``: global tokens per step / median step time over ``--trials`` timed steps,
  taken after every case ran ``--warmup`` steps, interleaved one step of each case per round so
  that load from other processes reaches all four alike.
- the same gradient clipping for all four: ``--max-grad-norm`` (default 1.0, DeepSpeed's own
  default ``gradient_clipping``; heddle's Trainer gets ``max_grad_norm``), so they train alike.
- ``comm_mb_per_step``: bytes rank 0 sent in one untimed step, from heddle's CommLedger. FSDP2
  and DeepSpeed call ``torch.distributed`` directly; while this scenario runs, a tap routes
  those collectives (all-reduce, reduce, broadcast, all-gather, reduce-scatter, all-to-all)
  through heddle.dist's wrappers so the ledger prices them exactly as heddle's own calls.
  heddle's own calls are not routed twice.
- DeepSpeed runs with its defaults except the batch sizes, AdamW and clipping: ZeRO-3 keeps
  tensors under ``stage3_param_persistence_threshold`` (1e5 elements) gathered and, within
  ``stage3_max_live_parameters``, reuses forward's gathered parameters in backward (one
  all-gather per step where FSDP2, resharding after forward, does two).
- ``losses_json``: the global mean loss of every step (warm-up, measuring, timed);
  ``max_loss_rel_diff`` against the first case.
"""

from __future__ import annotations

import ctypes
import gc
import inspect
import json
import sys
import threading

import torch
import torch.distributed as dist
import torch.distributed.distributed_c10d as c10d
import torch.nn.functional as F

import heddle
import heddle.dist as hd
from heddle.bench.scenario import BenchContext, Scenario, summarize
from heddle.data import ByteCorpus, WindowSampler
from heddle.dist.ledger import record
from heddle.models import GPT, GPTConfig

IMPLS = ("ddp", "fsdp", "zero2", "zero3")
MB = 1e6


# -- torch.distributed -> heddle.dist tap -----------------------------------------------------
_tap_state = threading.local()


def _route(op: str, orig, a: dict):
    """Issue ``op`` with bound arguments ``a`` through heddle.dist's wrapper (recorded once)."""
    if op == "all_reduce":
        return hd.all_reduce(a["tensor"], op=a["op"], group=a["group"], async_op=a["async_op"])
    if op in ("all_gather_single", "all_gather_into_tensor", "_all_gather_base"):
        return hd.all_gather_into_tensor(a["output_tensor"], a["input_tensor"], group=a["group"],
                                         async_op=a["async_op"])
    if op in ("reduce_scatter_single", "reduce_scatter_tensor", "_reduce_scatter_base"):
        return hd.reduce_scatter_tensor(a["output"], a["input"], op=a["op"], group=a["group"], async_op=a["async_op"])
    if op == "all_gather":
        return hd.all_gather(a["tensor_list"], a["tensor"], group=a["group"], async_op=a["async_op"])
    if op == "broadcast" and a.get("group_src") is None:
        return hd.broadcast(a["tensor"], src=a["src"], group=a["group"], async_op=a["async_op"])
    if op == "reduce" and a.get("group_dst") is None:
        return hd.reduce(a["tensor"], dst=a["dst"], op=a["op"], group=a["group"], async_op=a["async_op"])
    if op == "all_to_all_single":
        return hd.all_to_all_single(a["output"], a["input"], a["output_split_sizes"], a["input_split_sizes"],
                                    group=a["group"], async_op=a["async_op"])
    if op == "reduce_scatter":   # list form: no heddle wrapper; priced like reduce_scatter_tensor
        _, n = hd.group_rank_size(a["group"])
        total = sum(t.numel() * t.element_size() for t in a["input_list"])
        moved = (n - 1) * total // n if n > 1 else 0
        record("reduce_scatter", n, moved, moved)
    return orig(**a)


class TorchCollectiveTap:
    """While active, collectives called through ``torch.distributed`` by anything but heddle.dist
    (FSDP2, DeepSpeed) are issued through heddle.dist's wrappers, so a CommLedger prices them.
    Patches both ``torch.distributed`` and ``distributed_c10d`` (DeepSpeed resolves some
    functions once, when its backend starts: start DeepSpeed after entering the tap)."""

    OPS = ("all_reduce", "all_gather_single", "all_gather_into_tensor", "_all_gather_base", "reduce_scatter_single",
           "reduce_scatter_tensor", "_reduce_scatter_base", "all_gather", "broadcast", "reduce", "all_to_all_single",
           "reduce_scatter")

    def __init__(self):
        self._saved: list[tuple[object, str, object]] = []

    def __enter__(self) -> "TorchCollectiveTap":
        for op in self.OPS:
            orig = getattr(c10d, op, None)
            if orig is None:
                continue
            tapped = self._tapped(op, orig)
            for module in (c10d, dist):
                if getattr(module, op, None) is orig:
                    self._saved.append((module, op, orig))
                    setattr(module, op, tapped)
        return self

    def __exit__(self, *exc) -> None:
        for module, op, orig in reversed(self._saved):
            setattr(module, op, orig)
        self._saved.clear()

    @staticmethod
    def _tapped(op: str, orig):
        signature = inspect.signature(orig)

        def tapped(*args, **kwargs):
            caller = sys._getframe(1).f_globals.get("__name__", "")
            if getattr(_tap_state, "depth", 0) or caller == "heddle.dist.collectives":
                return orig(*args, **kwargs)
            try:
                bound = signature.bind(*args, **kwargs)
            except TypeError:
                return orig(*args, **kwargs)
            bound.apply_defaults()
            _tap_state.depth = 1
            try:
                return _route(op, orig, dict(bound.arguments))
            finally:
                _tap_state.depth = 0
        tapped.__wrapped__ = orig
        return tapped


# -- memory ---------------------------------------------------------------------------------
def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


def _storages_bytes(tensors, seen: dict) -> int:
    """Bytes of the storages of ``tensors`` not in ``seen`` yet (shared storage counted once)."""
    total = 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.device.type == "meta":   # meta: shapes only, no memory
            continue
        s = _local(t).untyped_storage()
        key = (s.data_ptr(), s.nbytes())
        if s.nbytes() == 0 or key in seen:
            continue
        seen[key] = True
        total += s.nbytes()
    return total


def _tensors_in(obj, depth: int = 0):
    """Every tensor inside nested dicts / lists / tuples (not inside other objects)."""
    if torch.is_tensor(obj):
        yield obj
    elif depth < 6 and isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors_in(v, depth + 1)
    elif depth < 6 and isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors_in(v, depth + 1)


def state_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer, zero=None) -> dict[str, int]:
    """Per-rank bytes by kind, each storage counted once (in the first kind that holds it)."""
    seen: dict = {}
    params = list(module.parameters())
    out = {"params": _storages_bytes([getattr(p, "ds_tensor", None) for p in params] + params, seen),
           "grads": _storages_bytes([p.grad for p in params], seen)}
    if zero is not None:   # DeepSpeed's ZeRO optimizer: its gradient partitions, then everything else
        attrs = vars(zero)
        out["grads"] += _storages_bytes([t for name, v in attrs.items() if "grad" in name.lower()
                                         for t in _tensors_in(v)], seen)
    out["optimizer"] = _storages_bytes(_tensors_in(dict(optimizer.state)), seen)
    out["other"] = 0 if zero is None else _storages_bytes([t for v in vars(zero).values() for t in _tensors_in(v)],
                                                          seen)
    out["total"] = sum(out.values())
    return out


def _release_memory() -> None:
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)   # give freed heap back, so the next case starts low
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")    # resets VmHWM to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def _rss_mb(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    return float("nan")


# -- the scenario ---------------------------------------------------------------------------
class Sharding(Scenario):
    name = "sharding"
    help = "heddle DDP vs FSDP2 vs DeepSpeed ZeRO-2/3 on one GPT: state bytes/rank, peak RSS, tokens/s, bytes, loss"
    min_procs = 2
    quick_args = ["--d-model", "64", "--layers", "2", "--heads", "4", "--seq-len", "32", "--batch-size", "4",
                  "--warmup", "1", "--trials", "3"]

    def add_options(self, parser):
        parser.add_argument("--impls", default=",".join(IMPLS), help=f"comma-separated subset of {','.join(IMPLS)}")
        parser.add_argument("--d-model", type=int, default=384)
        parser.add_argument("--layers", type=int, default=6)
        parser.add_argument("--heads", type=int, default=6)
        parser.add_argument("--seq-len", type=int, default=128)
        parser.add_argument("--batch-size", type=int, default=8, help="global sequences per step")
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--max-grad-norm", type=float, default=1.0,
                            help="gradient clipping for all four (1.0 is DeepSpeed's default; 0: none)")

    def _impls(self, options) -> list[str]:
        impls = [s.strip() for s in options.impls.split(",") if s.strip()]
        bad = [s for s in impls if s not in IMPLS]
        if bad or not impls:
            raise ValueError(f"--impls={options.impls!r}: valid are {', '.join(IMPLS)} (comma-separated)")
        return impls

    def run(self, ctx: BenchContext, options) -> list[dict]:
        impls = self._impls(options)
        if options.batch_size % ctx.world_size:
            raise ValueError(f"--batch-size={options.batch_size} must be divisible by the {ctx.world_size} processes")
        cfg = GPTConfig(d_model=options.d_model, n_layers=options.layers, n_heads=options.heads,
                        max_seq_len=options.seq_len)
        corpus = ByteCorpus.stdlib(max_bytes=1 << 20)
        tokens = options.batch_size * options.seq_len
        cases: list[dict] = []
        try:
            with TorchCollectiveTap():
                # 1. one case after the other: warm-up steps, then an untimed measuring step (bytes on
                #    the wire, state held, peak RSS growth); every runner stays alive for part 2
                for impl in impls:
                    cases.append(self._setup_case(ctx, options, cfg, corpus, impl))
                # 2. the timed steps, interleaved (one step of each case per round): load from other
                #    processes on the machine reaches every case alike
                for _ in range(options.trials):
                    for case in cases:
                        x, y = case["sampler"].next()
                        box = {}
                        case["times"].append(ctx.timed(lambda: box.update(loss=case["runner"].step(x, y))))
                        case["losses"].append(case["runner"].global_loss(box["loss"]))
        finally:
            for case in cases:
                case["runner"].close()
        rows = []
        for case in cases:
            row, losses = case["row"], case["losses"]
            stats = summarize(case["times"])
            row.update(tokens_per_s=tokens / stats["median_s"], step_time_s=stats["median_s"], **stats,
                       losses_json=json.dumps(losses), loss_first=losses[0], loss_last=losses[-1])
            rows.append(row)
            ctx.log(f"sharding {row['impl']}: state {row['state_mb']:.1f} MB/rank, peak RSS growth "
                    f"{row['peak_rss_over_start_mb']:.0f} MB, {row['tokens_per_s']:,.0f} tokens/s, "
                    f"{row['comm_mb_per_step']:.1f} MB sent/step, loss {row['loss_first']:.4f} -> {row['loss_last']:.4f}")
        base = rows[0]
        base_losses = json.loads(base["losses_json"])
        for r in rows:
            losses = json.loads(r["losses_json"])
            r["state_vs_first"] = r["state_mb"] / base["state_mb"]
            r["tokens_per_s_vs_first"] = r["tokens_per_s"] / base["tokens_per_s"]
            r["max_loss_rel_diff"] = max(abs(a - b) / abs(b) for a, b in zip(losses, base_losses))
        return rows

    def _setup_case(self, ctx: BenchContext, options, cfg: GPTConfig, corpus: ByteCorpus, impl: str) -> dict:
        _release_memory()
        ctx.barrier()
        start_rss = _rss_mb("VmRSS")
        peak_ok = _reset_peak_rss()
        torch.manual_seed(options.seed)
        model = GPT(cfg)
        num_params = sum(p.numel() for p in model.parameters())
        sampler = WindowSampler(corpus.train, options.seq_len, options.batch_size, seed=options.seed,
                                dp_rank=ctx.rank, dp_size=ctx.world_size)
        runner = (_HeddleRunner if impl in ("ddp", "fsdp") else _DeepSpeedRunner)(ctx, options, model, impl)
        case = {"runner": runner, "sampler": sampler, "losses": [], "times": []}
        try:
            for _ in range(options.warmup):
                x, y = sampler.next()
                case["losses"].append(runner.global_loss(runner.step(x, y)))
            x, y = sampler.next()     # untimed: bytes on the wire and the state held after backward
            with hd.CommLedger() as ledger:
                runner.forward_backward(x, y)
                held = runner.held_bytes()
                loss = runner.finish_step()
            case["losses"].append(runner.global_loss(loss))
        except BaseException:
            runner.close()
            raise
        measured = [held[k] for k in ("params", "grads", "optimizer", "other", "total")]
        measured += [_rss_mb("VmHWM"), _rss_mb("VmHWM") - start_rss]
        held_t = torch.tensor(measured, dtype=torch.float64)
        if ctx.world_size > 1:
            hd.all_reduce(held_t, op=hd.ReduceOp.MAX, group=ctx.group)
        ops: dict = {}
        for r in ledger.records:
            ops.setdefault(r.op, {"calls": 0, "bytes_sent": 0})
            ops[r.op]["calls"] += 1
            ops[r.op]["bytes_sent"] += r.bytes_sent
        case["row"] = {
            "impl": impl, "label": runner.label, "params": num_params, "d_model": cfg.d_model,
            "layers": cfg.n_layers, "seq_len": options.seq_len, "global_batch": options.batch_size,
            "max_grad_norm": options.max_grad_norm,
            "state_mb": float(held_t[4]) / MB, "params_mb": float(held_t[0]) / MB, "grads_mb": float(held_t[1]) / MB,
            "optimizer_mb": float(held_t[2]) / MB, "other_mb": float(held_t[3]) / MB,
            "peak_rss_mb": float(held_t[5]), "peak_rss_over_start_mb": float(held_t[6]),
            "peak_rss_kind": "VmHWM reset at the case's start" if peak_ok else "VmHWM since process start",
            "comm_mb_per_step": ledger.bytes_sent() / MB, "comm_ops_json": json.dumps(ops, sort_keys=True)}
        return case


class _HeddleRunner:
    def __init__(self, ctx: BenchContext, options, model, impl: str):
        self.ctx, self.label = ctx, f"heddle {impl.upper() if impl == 'ddp' else 'FSDP2'}"
        config = heddle.TrainerConfig(data_parallel=impl, progress=False, max_grad_norm=options.max_grad_norm or None)
        lr = options.lr
        self.trainer = heddle.Trainer(model, lambda params: torch.optim.AdamW(params, lr=lr, weight_decay=0.0),
                                      config=config, group=ctx.group)

    def forward_backward(self, x, y) -> None:
        logits = self.trainer.model(x)
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
        self.trainer.backward(loss, num_tokens=y.numel())

    def finish_step(self) -> float:
        return self.trainer.step()["loss"]       # already the global token mean

    def step(self, x, y) -> float:
        self.forward_backward(x, y)
        return self.finish_step()

    def global_loss(self, loss: float) -> float:
        return float(loss)

    def held_bytes(self) -> dict[str, int]:
        return state_bytes(self.trainer.module, self.trainer.optimizer)

    def close(self) -> None:
        self.trainer.close()


class _DeepSpeedRunner:
    def __init__(self, ctx: BenchContext, options, model, impl: str):
        try:
            import deepspeed
        except ImportError as e:
            raise ValueError(f"--impls {impl} needs DeepSpeed: pip install 'heddle[deepspeed]' ({e})") from None
        self.ctx, self.stage = ctx, int(impl[-1])
        self.label = f"DeepSpeed ZeRO-{self.stage}"
        if ctx.group is not None:
            raise ValueError("the DeepSpeed cases run on the default process group; start the bench without a subgroup")
        deepspeed.init_distributed(dist_backend="gloo")     # adopts the running process group
        config = {"train_batch_size": options.batch_size,
                  "train_micro_batch_size_per_gpu": options.batch_size // ctx.world_size,
                  "gradient_accumulation_steps": 1,
                  "optimizer": {"type": "AdamW", "params": {"lr": options.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                            "weight_decay": 0.0, "torch_adam": True}},
                  "gradient_clipping": options.max_grad_norm,      # its default, 1.0, unless told
                  "zero_optimization": {"stage": self.stage}, "steps_per_print": 2**31 - 1}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                                                 config=config)
        self.module = model

    def forward_backward(self, x, y) -> None:
        logits = self.engine(x)
        self._loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())   # local mean; ZeRO averages ranks
        self.engine.backward(self._loss)

    def finish_step(self) -> torch.Tensor:
        self.engine.step()
        return self._loss.detach()

    def step(self, x, y) -> torch.Tensor:
        self.forward_backward(x, y)
        return self.finish_step()

    def global_loss(self, loss: torch.Tensor) -> float:
        t = loss.reshape(1).to(torch.float64)
        if self.ctx.world_size > 1:     # outside the timed step: a report, not DeepSpeed's training
            dist.all_reduce(t, group=self.ctx.group)
        return float(t) / self.ctx.world_size

    def held_bytes(self) -> dict[str, int]:
        zero = self.engine.optimizer
        inner = getattr(zero, "optimizer", zero)
        return state_bytes(self.module, inner, zero=zero)

    def close(self) -> None:
        destroy = getattr(self.engine, "destroy", None)
        if destroy is not None:
            destroy()
        self.engine = self.optimizer = None


SCENARIO = Sharding()
