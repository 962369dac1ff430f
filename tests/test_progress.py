"""Progress and timing output: readable lines when stderr is not a terminal, and the time
by phase a run prints at its end."""

import io

from vlbench.monitor import progress, timing


def test_line_progress_prints_whole_lines_at_most_every_interval(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    monkeypatch.setattr(progress, "_last_line", [0.0])
    monkeypatch.setenv("VLBENCH_PROGRESS_SECONDS", "10")
    out = io.StringIO()
    bar = progress.LineProgress(total=100, desc="cells", stream=out)
    for step in range(100):
        clock[0] += 1.0  # one second per item
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert "\r" not in out.getvalue()
    assert 9 <= len(lines) <= 12  # about one every 10 s, plus the closing line
    assert lines[-1].startswith("cells: 100/100 (100%)")
    assert "left" in lines[1] and "elapsed" in lines[1]


def test_nested_bars_share_one_line(monkeypatch):
    monkeypatch.setattr(progress, "_last_line", [0.0])
    monkeypatch.setattr(progress, "_open", [])
    out = io.StringIO()
    outer = progress.LineProgress(total=3, desc="cells", stream=out)
    inner = progress.LineProgress(total=5, desc="fit tecoa", leave=False, stream=out)
    inner.update(2)
    assert out.getvalue().splitlines()[-1].startswith("cells: 0/3") and "| fit tecoa: 2/5" in out.getvalue()
    inner.close()
    outer.close()
    assert out.getvalue().splitlines()[-1].startswith("cells: 0/3")


def test_disabled_progress_is_silent(capsys):
    for _ in progress.progress(range(3), desc="quiet", enabled=False):
        pass
    assert capsys.readouterr().err == ""


def test_clock_format():
    assert progress.clock(5) == "5s" and progress.clock(125) == "2m05s" and progress.clock(3720) == "1h02m"


def test_timing_summary_sums_phases_by_name():
    timing.take()
    with timing.phase("train tecoa"):
        pass
    timing.record("evaluate pgd", 2.0)
    timing.record("evaluate pgd", 3.0)
    records = timing.take()
    assert [name for name, _ in records] == ["train tecoa", "evaluate pgd", "evaluate pgd"]
    text = timing.summary(records, total=10)
    assert "evaluate pgd" in text and "5s  (2×)" in text and "total" in text
    assert timing.take() == []
