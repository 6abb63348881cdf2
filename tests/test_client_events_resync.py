"""A client in another process that cached a view of a name hears, once back from a broken
stream, that the name was deleted and bound anew while it was away or as it came back:
its next get answers the new variable, never the cached view (``yp/client_events.py``'s
resync).  In another process because the test process's clients share one cache per
fabric, and the test's own client hears every invalidation."""

from __future__ import annotations

import subprocess
import sys

import numpy as np

from tests.test_client_events import CutAtStreamStart, _cut, _cut_at_start, _install, _owed, _state, _uninstall
from tests.waiting import wait_for

READER = """
import sys
from distributed import Client
import datafabric

with Client(sys.argv[1]) as client:
    fabric = datafabric.connect(client)
    print(client.id, flush=True)
    for line in sys.stdin:
        try:
            view = fabric.get(line.strip())
            print(len(view), float(view[0]), flush=True)
        except Exception as exc:
            print("error", type(exc).__name__, exc, flush=True)
"""


class Reader:
    def __init__(self, address: str, tmp_path) -> None:
        script = tmp_path / "reader.py"
        script.write_text(READER)
        self.proc = subprocess.Popen(
            [sys.executable, str(script), address], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.id = self.proc.stdout.readline().strip()

    def get(self, name: str) -> tuple[int, float]:
        self.proc.stdin.write(name + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().split()
        assert answer and answer[0] != "error", answer
        return int(answer[0]), float(answer[1])

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(30)


def _back(client, reader) -> bool:
    return client.run_on_scheduler(_state, client_id=reader.id) == (
        True,
        True,
    ) and reader.id not in client.run_on_scheduler(_owed)


def test_a_name_bound_anew_while_a_reader_was_away_or_coming_back_is_read_anew(client, fabric, tmp_path):
    fabric.insert("rs/x", "", np.float64, np.full(4, 1.0))
    reader = Reader(client.scheduler.address, tmp_path)
    try:
        assert reader.get("rs/x") == (4, 1.0)  # cached from here on; it subscribed with its first call
        wait_for(lambda: _back(client, reader), "the reader on the fabric's topic")
        client.run_on_scheduler(_install, cls=CutAtStreamStart)
        try:
            for n in range(2, 5):
                # away: every registration of the reader is cut until the name is bound anew
                client.run_on_scheduler(_cut_at_start, client_id=reader.id, times=-1)
                client.run_on_scheduler(_cut, client_id=reader.id)
                wait_for(lambda: client.run_on_scheduler(_state, client_id=reader.id)[0] is False, "the reader away")
                fabric.delete("rs/x")
                fabric.insert("rs/x", "", np.float64, np.full(4 + n, float(n)))  # another length: never the old view
                client.run_on_scheduler(_cut_at_start, client_id=reader.id, times=0)
                wait_for(lambda: _back(client, reader), f"the reader back (round {n})", 60)
                assert reader.get("rs/x") == (4 + n, float(n))
            # coming back: the name is bound anew as the reader reconnects
            client.run_on_scheduler(_cut, client_id=reader.id)
            fabric.delete("rs/x")
            fabric.insert("rs/x", "", np.float64, np.full(16, 9.0))
            wait_for(lambda: _back(client, reader), "the reader back", 60)
            assert reader.get("rs/x") == (16, 9.0)
        finally:
            client.run_on_scheduler(_uninstall, cls=CutAtStreamStart)
    finally:
        reader.close()
        fabric.delete("rs/x")
