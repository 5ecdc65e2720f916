"""Synthesis killed with SIGKILL at many points, each run resumed by the next: the final outputs are
identical to an uninterrupted run's, with no journaled request lost or re-sent.

The kill points are the moments a stage's output becomes visible (each rename into place, just
before and just after it, so also between writing an output and its completion marker), plus one
SIGKILL from outside while requests are in flight. A real subprocess each time, the scripted
test-double server (with transient faults) as every endpoint.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import datasets
import pytest

from cosa_jax.endpoint.journal import Journal, read_counts
from cosa_jax.synth import stages
from cosa_jax.testing.scripted_server import FakeChatServer, ScriptedReplies
from launch.progress import main as progress_main, run_progress

REPO = Path(__file__).resolve().parents[1]

# Imports once, then forks one real process per run (imports take most of a run's time on a
# loaded machine); each run's stdout and stderr go to its own log file.
ZYGOTE = r"""
import importlib.util, json, os, signal, sys, traceback
from cosa_jax.synth import stages
spec = importlib.util.spec_from_file_location("synth_demo", "configs/synth_demo.py")
mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)

def run(out_dir, base_url, kill_at, phase):
    cfg = mod.get_config()
    cfg.out_dir = out_dir
    cfg.progress = False
    for role in cfg.endpoints:
        e = cfg.endpoints[role]
        e.base_url, e.backoff_base_s, e.backoff_max_s, e.timeout_s, e.concurrency = base_url, 0.01, 0.05, 5.0, 8
    real_rename = stages._rename
    def rename(src, dst):
        hit = os.path.relpath(dst, out_dir) == kill_at
        if hit and phase == "before":
            os.kill(os.getpid(), signal.SIGKILL)
        real_rename(src, dst)
        if hit and phase == "after":
            os.kill(os.getpid(), signal.SIGKILL)
    stages._rename = rename
    stages.run_all(cfg)
    print("DONE", flush=True)

for line in sys.stdin:
    args = json.loads(line)
    pid = os.fork()
    if pid == 0:
        fd = os.open(args.pop("log"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
        os.dup2(fd, 1); os.dup2(fd, 2)
        try:
            run(**args)
            code = 0
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stdout.flush(); sys.stderr.flush()
        os._exit(code)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class Runs:
    """One synthesis process per ``start``; ``wait`` gives (returncode, its output)."""

    def __init__(self, tmp: Path):
        self.tmp, self.n = tmp, 0
        self.z = subprocess.Popen([sys.executable, "-c", ZYGOTE], cwd=REPO, env=dict(os.environ, PYTHONPATH=str(REPO)),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def start(self, out: Path, srv, kill_at: str = "-", phase: str = "-") -> int:
        self.n += 1
        self.log = self.tmp / f"run{self.n}.log"
        self.z.stdin.write(json.dumps(dict(out_dir=str(out), base_url=srv.base_url, kill_at=kill_at, phase=phase,
                                           log=str(self.log))) + "\n")
        self.z.stdin.flush()
        return json.loads(self.z.stdout.readline())["pid"]

    def wait(self) -> tuple[int, str]:
        line = self.z.stdout.readline()
        assert line, "the forking helper process died"
        return json.loads(line)["rc"], self.log.read_text()

    def run(self, out: Path, srv, kill_at: str = "-", phase: str = "-") -> tuple[int, str]:
        self.start(out, srv, kill_at, phase)
        return self.wait()

    def close(self) -> None:
        self.z.stdin.close()
        self.z.wait(timeout=30)


# (renamed path relative to out_dir, before|after), in the order an uninterrupted run reaches them
KILLS = [
    ("prompts", "after"),  # output in place, no summary, no marker
    ("summaries/label_prompts.json", "after"),  # output and summary, no marker
    ("labelled_prompts/_COMPLETE", "before"),  # the marker written to its temp file, not renamed
    ("responses", "before"),  # the stage's temp output complete, not renamed
    ("pairs", "after"),  # the failure of issue 27: pairs/ in place, pairs_jsonl/ not written
    ("pairs_jsonl", "after"),  # every output written, summary and marker not
    ("pairs/_COMPLETE", "before"),
]
EXTERNAL = "label_responses"  # SIGKILL from outside once this stage's journal has some replies


def _cfg(out):
    from cosa_jax.synth.config import default_config
    c = default_config()
    c.out_dir = str(out)
    return c


def _snapshot(out: Path) -> dict:
    """Everything a run leaves that must not depend on kills: datasets, exports, summaries, journals."""
    snap = {}
    for s in stages.STAGES:
        d = datasets.load_from_disk(str(out / stages.OUTPUT_DIR[s]))
        snap[s] = {k: v.to_list() for k, v in d.items()} if isinstance(d, datasets.DatasetDict) else d.to_list()
        summ = json.loads((out / "summaries" / f"{s}.json").read_text())
        snap[f"summary:{s}"] = {k: v for k, v in summ.items() if k not in ("seconds", "usage")}
    for f in sorted((out / "pairs_jsonl").iterdir()):
        snap[f"jsonl:{f.name}"] = f.read_bytes()
    for db in sorted((out / "journal").glob("*.sqlite")):
        with Journal(db) as j:
            assert j.counts()["pending"] == 0 and j.counts()["failed"] == 0, (db, j.counts())
            snap[f"journal:{db.stem}"] = {k: j.get(k) for k in j.keys()}
    return snap


def test_sigkill_at_every_kind_of_point_then_resume_is_identical(tmp_path, capsys):
    runs = Runs(tmp_path)
    with FakeChatServer(ScriptedReplies(judge_garbage_rate=0.1), fault_rate=0.1,
                        fault_kinds=("429", "500", "drop"), seed=5) as srv:
        rc, log = runs.run(tmp_path / "ref", srv)
        assert rc == 0 and "DONE" in log, log[-3000:]
        ref = _snapshot(tmp_path / "ref")
        ref_ok = dict(srv.ok)  # valid replies per request fingerprint: the uninterrupted count
        srv.ok.clear()

        out = tmp_path / "killed"
        n_kills = 0
        for kill_at, phase in KILLS[:4]:
            rc, log = runs.run(out, srv, kill_at, phase)
            assert rc == -signal.SIGKILL, (kill_at, phase, rc, log[-3000:])
            n_kills += 1
        # a kill from outside while the response judges are in flight
        pid = runs.start(out, srv)
        jdb = out / "journal" / f"{EXTERNAL}.sqlite"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if read_counts(jdb).done >= 100:  # read while the run writes
                    break
            except (FileNotFoundError, RuntimeError):
                pass
            time.sleep(0.005)
        os.kill(pid, signal.SIGKILL)
        rc, log = runs.wait()
        assert rc == -signal.SIGKILL, f"the run ended before it could be killed: {log[-3000:]}"
        n_kills += 1
        c = read_counts(jdb)
        assert c.done >= 100 and c.pending > 0  # killed mid-stage: planned requests left undone
        prog = run_progress(out)
        assert prog["generate_responses"]["state"] == "complete" and prog["generate_responses"]["pending"] == 0
        assert prog[EXTERNAL] == {"state": "running", "done": c.done, "failed": 0, "pending": c.pending}
        assert prog["pair"] == {"state": "not started"}
        for kill_at, phase in KILLS[4:]:
            rc, log = runs.run(out, srv, kill_at, phase)
            assert rc == -signal.SIGKILL, (kill_at, phase, rc, log[-3000:])
            n_kills += 1
        rc, log = runs.run(out, srv)
        assert rc == 0 and "DONE" in log, log[-3000:]
        assert "pair: output" in log and "is incomplete" in log  # pairs/ had no marker: redone, not skipped

        # damage after completion: a truncated export is re-derived on the next run
        train = out / "pairs_jsonl" / "train.jsonl"
        train.write_bytes(train.read_bytes()[:100])
        rc, log = runs.run(out, srv)
        assert rc == 0 and "train.jsonl differs" in log, log
        killed_ok = dict(srv.ok)
        runs.close()

    assert progress_main([str(out)]) == 0
    table = capsys.readouterr().out
    assert all(f"{s_:<20} complete" in table for s_ in stages.STAGES), table
    assert _snapshot(out) == ref  # identical outputs and journals: nothing lost, nothing duplicated
    # at the wire, every request was answered as often as in the uninterrupted run, except those in
    # flight at the external kill (answered, not yet journaled): at most one per worker again
    assert set(killed_ok) == set(ref_ok)
    extra = sum(killed_ok[k] - ref_ok[k] for k in ref_ok)
    assert 0 <= extra <= 8 and all(killed_ok[k] >= ref_ok[k] for k in ref_ok), extra
    with capsys.disabled():
        print(f"\nsynth crash-resume: {n_kills} SIGKILLs, {sum(ref_ok.values())} requests, "
              f"re-sent after a kill: {extra} (in flight at the external kill)")


def test_marker_checks_files_and_inputs(tmp_path):
    """stage_complete: a missing marker, a changed or extra file, or a changed input all say why."""
    cfg = _cfg(tmp_path)
    stages._write_atomic(datasets.Dataset.from_list([{"a": 1}]), stages.stage_path(cfg, "load_prompts"))
    assert stages.stage_complete(cfg, "load_prompts") == (False, f"no completion marker {tmp_path / 'prompts' / '_COMPLETE'}")
    stages._write_summary(cfg, "load_prompts", {"kept": 1})
    stages._write_marker(cfg, "load_prompts")
    assert stages.stage_complete(cfg, "load_prompts") == (True, "")
    marker = json.loads((tmp_path / "prompts" / "_COMPLETE").read_text())
    assert marker["rows"] == {"all": 1} and "summaries/load_prompts.json" in marker["files"]

    stages._write_atomic(datasets.Dataset.from_list([{"b": 2}]), stages.stage_path(cfg, "label_prompts"))
    stages._write_summary(cfg, "label_prompts", {})
    stages._write_marker(cfg, "label_prompts")
    assert stages.stage_complete(cfg, "label_prompts")[0]
    (tmp_path / "summaries" / "load_prompts.json").write_text("{}")
    ok, why = stages.stage_complete(cfg, "load_prompts")
    assert not ok and "load_prompts.json differs" in why
    stages._write_summary(cfg, "load_prompts", {"kept": 1})
    (tmp_path / "prompts" / "stray.arrow").write_bytes(b"x")
    ok, why = stages.stage_complete(cfg, "load_prompts")
    assert not ok and "stray.arrow" in why
    (tmp_path / "prompts" / "stray.arrow").unlink()
    assert stages.stage_complete(cfg, "load_prompts")[0]
    stages._write_atomic(datasets.Dataset.from_list([{"a": 3}]), stages.stage_path(cfg, "load_prompts"))
    stages._write_marker(cfg, "load_prompts")  # the input was redone with other rows since
    ok, why = stages.stage_complete(cfg, "label_prompts")
    assert not ok and "input stage 'load_prompts' changed" in why
    with pytest.raises(stages.StageError, match="incomplete .*run stage 'label_prompts' first"):
        stages._read_stage(cfg, "label_prompts")
