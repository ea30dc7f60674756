"""The quick set of the seeded fault campaign (tests/checkpoint/fault_campaign.py; the long one is
`make fault-campaign`): one trial per fault kind, at fixed points chosen so that each fires after
at least one commit. Every trainer runs in parallel; the whole set is one test so that it pays
the torch import once per trainer."""

from tests.checkpoint.fault_campaign import Trial, details, error_line, run_trials, table

# (kind, n): the n-th event of that kind, see fault_campaign's docstring
QUICK = [("snapshot", 5), ("flush", 17), ("commit", 6), ("commit-after", 3), ("retention", 2),
         ("keeper", 4), ("disk-full", 4)]


def test_quick_fault_campaign(tmp_path):
    trials = run_trials([Trial(kind, nth) for kind, nth in QUICK], str(tmp_path), parallel=len(QUICK),
                        timeout=60.0)
    report = table(trials) + "\n" + details(trials)
    failures = []
    for t in trials:
        name = f"{t.kind} #{t.nth}"
        if not t.killed_at or "late" in t.killed_at:
            failures.append(f"{name}: the fault never fired ({t.killed_at or 'trainer died first'})")
        if t.hung:
            failures.append(f"{name}: the trainer hung")
        if t.lost:
            failures.append(f"{name}: restore lost or tore state (committed {t.committed}, disk {t.disk_step}, "
                            f"memory {t.mem_step}, exact {t.exact})")
        if t.kind == "keeper" and not t.continued and "keeper" not in error_line(t.stderr).lower():
            failures.append(f"{name}: after the keeper died the trainer neither went on with disk saves nor "
                            f"stopped with an error naming the keeper ({error_line(t.stderr)!r})")
        if t.kind == "disk-full":
            if not t.continued and "No space left" not in t.stderr:
                failures.append(f"{name}: the trainer stopped without saying the disk is full")
            if not t.resumed:
                failures.append(f"{name}: a resume could not save again after the disk was freed")
    assert not failures, "\n".join(failures) + "\n\n" + report
