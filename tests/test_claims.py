"""Claims on shared work: one owner at a time, dead owners taken over, releases that never
remove a newer owner's claim."""

import json
import os
import subprocess
import sys
import time

from vlbench.store.claims import Claim, live_claims, read_claim


def test_a_live_claim_is_refused_and_released(tmp_path):
    first, second = Claim(tmp_path, "cell-a"), Claim(tmp_path, "cell-a")
    assert first.take()
    assert not second.take()
    assert set(live_claims(tmp_path)) == {"cell-a"}
    owner = json.loads(first.path.read_text())
    assert owner["pid"] == os.getpid() and owner["host"]
    first.release()
    assert not first.path.exists() and live_claims(tmp_path) == {}
    assert second.take()
    second.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".claims.lock"]


def test_the_claim_of_a_dead_process_is_taken_over(tmp_path):
    # a child takes the claim and is killed with SIGKILL while holding it
    code = ("import sys, time; sys.path.insert(0, %r); from vlbench.store.claims import Claim; "
            "c = Claim(%r, 'cell-b'); assert c.take(); print('held', flush=True); time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code % (os.getcwd(), str(tmp_path))], stdout=subprocess.PIPE,
                             text=True)
    assert child.stdout.readline().strip() == "held"
    assert not Claim(tmp_path, "cell-b").take()
    child.kill()
    child.wait()
    state = read_claim(tmp_path / "cell-b.claim")
    assert state is not None and state.stale
    taker = Claim(tmp_path, "cell-b")
    assert taker.take()
    taker.release()


def test_a_foreign_owner_is_stale_only_after_the_lease(tmp_path, monkeypatch):
    monkeypatch.setenv("VLBENCH_LEASE_SECONDS", "30")
    path = tmp_path / "cell-c.claim"
    path.write_text(json.dumps({"host": "another-node", "pid": 1, "token": "t", "started": time.time()}))
    assert not Claim(tmp_path, "cell-c").take()  # fresh heartbeat: alive, as far as anyone can tell
    old = time.time() - 31
    os.utime(path, (old, old))
    taker = Claim(tmp_path, "cell-c")
    assert taker.take()
    assert json.loads(path.read_text())["token"] == taker.owner.token
    taker.release()


def test_the_heartbeat_keeps_a_claim_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv("VLBENCH_LEASE_SECONDS", "2")
    claim = Claim(tmp_path, "cell-d")
    assert claim.take()
    old = time.time() - 100
    os.utime(claim.path, (old, old))
    time.sleep(1.5)  # the heartbeat ticks every lease/4 (at least 0.5 s)
    assert read_claim(claim.path).heartbeat_age < 2
    claim.release()


def test_a_slow_owner_does_not_release_its_successors_claim(tmp_path, monkeypatch):
    monkeypatch.setenv("VLBENCH_LEASE_SECONDS", "30")
    slow = Claim(tmp_path, "cell-e")
    assert slow.take()
    # another host took it over after the lease (simulated: its owner record replaces ours)
    successor = {"host": "another-node", "pid": 1, "token": "theirs", "started": time.time()}
    slow.path.write_text(json.dumps(successor))
    slow.release()
    assert json.loads(slow.path.read_text())["token"] == "theirs"
