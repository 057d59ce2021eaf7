import json

import numpy as np
import torch
import pytest
import zarr
from typer.testing import CliRunner

from daskrecon.cli import app
from daskrecon.demo import demo_schedule


@pytest.mark.parametrize("denoiser", ["drunet", "dncnn"])
def test_demo_runs_small_and_writes_its_outputs(tmp_path, denoiser):
    out = tmp_path / "demo"
    result = CliRunner().invoke(app, ["demo", "--size", "64", "--iterations", "10", "--workers", "1",
                                      "--output", str(out), "--no-progress", "--denoiser", denoiser])
    assert result.exit_code == 0, result.output
    assert {"drunet": "bundled DRUNet", "dncnn": "bundled DnCNN"}[denoiser] in (out / "summary.json").read_text()
    assert "dashboard: http://127.0.0.1" in result.output and "PSNR: best measurement" in result.output
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["psnr_measurements_db"]) == 3 and np.isfinite(summary["psnr_reconstruction_db"])
    assert summary["psnr_reconstruction_db"] > max(summary["psnr_measurements_db"])
    if denoiser == "drunet":  # ADMM with the σ schedule over the 10 iterations asked, the denoiser averaged
        assert summary["settings"]["algorithm"] == "admm" and len(summary["settings"]["sigma_denoiser"]) == 10
        assert "averaged over 8 flips/rotations" in summary["algorithm"]
        from daskrecon.tasks.precision import supported  # bf16 where this CPU runs it, its error probed and shown

        expected = "bf16" if "bf16" in supported(torch.device("cpu")) else "fp32"
        assert summary["precision"]["asked"] == summary["precision"]["tiles"] == expected
        assert (summary["precision"]["relative_error"] is not None) == (expected == "bf16")
    else:
        assert summary["settings"]["algorithm"] == "red"
    assert zarr.open_array(str(out / "reconstruction.zarr")).shape == (1, 3, 64, 64)
    for name in ("demo.png", "convergence.png"):
        assert (out / name).stat().st_size > 1000
    if denoiser == "dncnn":  # the same folder again: an earlier demo's outputs are replaced
        again = CliRunner().invoke(app, ["demo", "--size", "64", "--iterations", "2", "--workers", "1",
                                         "--output", str(out), "--no-progress", "--denoiser", denoiser])
        assert again.exit_code == 0, again.output
        assert json.loads((out / "summary.json").read_text())["iterations"] == 2


def test_the_demo_schedule_decreases_and_its_step_follows():
    s = demo_schedule(5)
    sig, gam = s["sigma_denoiser"], s["step_size"]
    assert len(sig) == 5 and sig[0] == pytest.approx(0.2) and sig[-1] == pytest.approx(0.08)
    assert all(a > b for a, b in zip(sig, sig[1:]))
    assert gam == pytest.approx([(v / 0.05) ** 2 for v in sig])
    assert demo_schedule(1)["sigma_denoiser"] == [0.08]
    with pytest.raises(ValueError, match="iterations must be a positive int"):
        demo_schedule(0)


def test_demo_refuses_an_unknown_denoiser(tmp_path):
    result = CliRunner().invoke(app, ["demo", "--denoiser", "drunett", "--output", str(tmp_path / "d")])
    assert result.exit_code == 2 and "not a bundled denoiser" in result.output
    assert not (tmp_path / "d").exists()
    result = CliRunner().invoke(app, ["demo", "--precision", "bf61", "--output", str(tmp_path / "d")])
    assert result.exit_code == 2 and "not a precision" in result.output
    assert not (tmp_path / "d").exists()


def test_demo_refuses_sizes_and_counts_it_cannot_run_before_any_work(tmp_path):
    """``--size 7`` failed inside torch ("Padding value causes wrapping around more than once") after the
    cluster started, ``--size 0`` with an OverflowError, ``--iterations 0`` with a traceback."""
    from daskrecon.demo import MIN_SIZE, demo_problem

    for args, option in ((["--size", str(MIN_SIZE - 1)], "--size"), (["--size", "0"], "--size"),
                         (["--iterations", "0"], "--iterations"), (["--workers", "0"], "--workers")):
        result = CliRunner().invoke(app, ["demo", *args, "--output", str(tmp_path / "d")])
        assert result.exit_code == 2 and f"Invalid value for '{option}'" in result.output, (args, result.output)
    assert not (tmp_path / "d").exists()
    x, ops, y = demo_problem(MIN_SIZE)  # the smallest it accepts runs its blurs
    assert x.shape[-2:] == (MIN_SIZE, MIN_SIZE) and all(t.shape == x.shape for t in y)
    with pytest.raises(ValueError, match=f"size must be at least {MIN_SIZE} pixels"):
        demo_problem(MIN_SIZE - 1)


def test_python_m_daskrecon_is_the_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "daskrecon", "info"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.startswith("daskrecon "), out.stdout + out.stderr


@pytest.mark.parametrize("command", ["demo", "reconstruct", "info"])
def test_every_option_s_help_is_shown_whole(command):
    """Rich reads `[...]` in a help text as markup and drops it: each option's help must reach the screen."""
    import re

    import typer

    click_command = typer.main.get_command(app).commands[command]
    shown = CliRunner().invoke(app, [command, "--help"], terminal_width=400, env={"COLUMNS": "400"}).output
    flat = re.sub(r"\s+", " ", re.sub(r"[│╭╮╰╯─]", " ", shown))
    helps = [p.help for p in click_command.params if getattr(p, "help", None)]
    assert helps
    for text in helps:
        assert re.sub(r"\s+", " ", text) in flat, (text, shown)


def test_info():
    result = CliRunner().invoke(app, ["info"])
    assert result.exit_code == 0 and "deepinv" in result.output and "GPUs:" in result.output
    bad = CliRunner().invoke(app, ["info", "--scheduler", "tcp://127.0.0.1:9", "--timeout", "1"])
    assert bad.exit_code == 1 and "NOT reachable" in bad.output


def test_the_demo_never_replaces_files_it_did_not_write(tmp_path):
    """`--output` a folder holding someone's demo.png / summary.json: refused before any work, all kept."""
    from helpers import snapshot

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "summary.json").write_text('{"my": "notes"}')
    (mine / "demo.png").write_bytes(b"not the demo's")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--size", "32", "--output", str(mine), "--no-progress"])
    assert result.exit_code == 2 and "not written by an earlier demo" in result.output
    assert "dashboard" not in result.output  # refused before the cluster
    (tmp_path / "afile").write_text("x")
    before = snapshot(tmp_path)
    result = CliRunner().invoke(app, ["demo", "--size", "32", "--output", str(tmp_path / "afile"), "--no-progress"])
    assert result.exit_code == 2 and "is a file" in result.output
    assert snapshot(tmp_path) == before


def test_ctrl_c_in_a_terminal_ends_the_demo_quietly_and_leaves_no_worker(tmp_path):
    """A terminal's Ctrl-C signals the whole foreground process group: the driver must be the only one to
    get it (the workers sit in sessions of their own), close the cluster and say "interrupted" — no
    worker dying mid-task with a traceback, no scheduler logging each send that failed, no process left."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import psutil

    cmd = [str(Path(sys.executable).parent / "daskrecon"), "demo", "--size", "128", "--iterations", "200", "--denoiser", "dncnn",
           "--workers", "2", "--output", str(tmp_path / "demo"), "--no-progress"]
    # the demo leads a process group of its own, as a shell's foreground job does
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            cwd=tmp_path)
    lines = []
    for line in proc.stdout:  # wait for the iterations to run
        lines.append(line)
        if line.startswith("Dask cluster:"):
            break
    time.sleep(3)
    spawned = psutil.Process(proc.pid).children(recursive=True)
    assert len(spawned) >= 4  # two nannies, two workers (and their resource trackers)
    os.killpg(proc.pid, signal.SIGINT)
    out = "".join(lines) + proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert out.rstrip().endswith("interrupted") and "Traceback" not in out and "distributed." not in out, out
    gone, alive = psutil.wait_procs(spawned, timeout=30)
    assert not alive, alive



@pytest.fixture
def log_levels_kept():
    """The handler silences distributed's loggers for good (the command ends); this test process goes on."""
    import logging

    import distributed  # noqa: F401  (its logging config)

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("distributed", "asyncio", "tornado")]
    levels = {n: logging.getLogger(n).level for n in ("distributed", "asyncio", "tornado", *names)}
    yield
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


def test_a_ctrl_c_that_python_drops_inside_a_gc_callback_still_ends_the_command(log_levels_kept):
    """Python runs a signal handler at the main thread's next bytecode; inside a garbage-collector callback
    (distributed's GC diagnosis installs one) the KeyboardInterrupt is printed as "Exception ignored" and
    dropped. CI caught the demo running on to its end, exit status 0, after a Ctrl-C had come just then."""
    import gc
    import os
    import signal
    import threading
    import time

    from daskrecon.cli import _quiet_on_interrupt

    def slow_callback(phase, info):
        if phase == "start":
            time.sleep(0.5)  # the signal comes while this runs; sleep is interrupted by the handler

    ran_on = []
    gc.callbacks.append(slow_callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _quiet_on_interrupt():
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
                gc.collect()
                time.sleep(5)  # the interrupt comes back by here
                ran_on.append("to the end")
    finally:
        if slow_callback in gc.callbacks:
            gc.callbacks.remove(slow_callback)
    assert ran_on == []


def test_a_dropped_ctrl_c_ends_the_command_even_when_the_work_ends_first(log_levels_kept):
    import gc
    import os
    import signal
    import threading
    import time

    from daskrecon.cli import _quiet_on_interrupt

    def slow_callback(phase, info):
        if phase == "start":
            time.sleep(0.5)

    gc.callbacks.append(slow_callback)
    try:
        with pytest.raises(KeyboardInterrupt):
            with _quiet_on_interrupt():
                threading.Timer(0.1, os.kill, (os.getpid(), signal.SIGINT)).start()
                gc.collect()  # the work ends right after the dropped interrupt, before the timer redelivers it
    finally:
        if slow_callback in gc.callbacks:
            gc.callbacks.remove(slow_callback)
    time.sleep(0.3)  # and the cancelled redelivery does not interrupt the caller afterwards


def test_ctrl_c_silences_every_logger_of_distributed_also_those_with_a_level_of_their_own():
    """distributed.client has its own level and handler: silencing "distributed" left its ERROR (a
    reconnect cancelled by the closing client, with a traceback) after "interrupted", now and then."""
    import logging
    import os
    import signal
    import time

    import distributed  # noqa: F401  (its logging config)

    from daskrecon.cli import _quiet_on_interrupt

    names = [n for n in logging.root.manager.loggerDict if n.split(".")[0] in ("distributed", "asyncio", "tornado")]
    levels = {n: logging.getLogger(n).level for n in ("distributed", *names)}
    try:
        with pytest.raises(KeyboardInterrupt):
            with _quiet_on_interrupt():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(5)  # Python runs the handler in the main thread at its next bytecode
        for name in ("distributed", "distributed.client", "distributed.scheduler", "asyncio"):
            assert not logging.getLogger(name).isEnabledFor(logging.CRITICAL), name
    finally:  # the command ends after an interrupt; this test process goes on
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
