"""The fabric over Dask's TLS, and no listening socket of its own."""

from __future__ import annotations

import os
import sys

import cloudpickle
import numpy as np
import psutil
from distributed import Client
from distributed.security import Security

import datafabric
from tests.conftest import local_cluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])


def listening_ports() -> set[int]:
    return {c.laddr.port for c in psutil.Process().net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}


def test_fabric_works_end_to_end_over_tls_and_opens_no_port():
    security = Security.temporary()
    with (
        local_cluster(security=security) as cluster,
        Client(cluster, security=security) as client,
    ):
        assert cluster.scheduler_address.startswith("tls://")
        ports_before = client.run(listening_ports)
        here_before = listening_ports()
        fabric = datafabric.start(client, mb=32)
        try:
            a, b = sorted(client.scheduler_info()["workers"])
            client.submit(lambda f: f.insert("secret", "", np.float64, np.arange(8.0)), fabric, workers=[a]).result()
            assert client.submit(lambda f: float(f.get("secret").sum()), fabric, workers=[b]).result() == 28.0
            assert fabric.get("secret").sum() == 28.0
            assert client.run(listening_ports) == ports_before
            assert listening_ports() == here_before
            for name in os.listdir("/dev/shm"):
                if name.startswith(f"dfab_{fabric.fabric_id[:8]}"):
                    assert os.stat(f"/dev/shm/{name}").st_mode & 0o777 == 0o600
        finally:
            fabric.shutdown()
