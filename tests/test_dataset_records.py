"""A dataset's record, the hidden variable a restarted YellowPages rebuilds it from: its
bytes give back every field of the sealed dataset, and its name parses back (no Dask)."""

from __future__ import annotations

import numpy as np

from datafabric.names import chunk_name, dataset_part, is_chunk_name, record_name
from yp.dataset_records import decode, encode
from yp.dataset_table import SEALED, DatasetRecord


class Chunk:
    def __init__(self, var_id: int) -> None:
        self.var_id = var_id


def test_a_record_gives_back_the_sealed_dataset_with_a_table_of_the_new_chunk_ids():
    record = DatasetRecord(
        17, "run/grid", (40, 30), ">int32", (10, 8), b"\xff\xff\xff\xfe", "a doc é", {"k": [1, None, "x"]}, "client"
    )
    back = decode(17, "node-a", encode(record, written=2), {0: Chunk(900), 15: Chunk(915)})
    assert back.state == SEALED and back.record_node == "node-a"
    message, original = back.message(), record.message()
    assert {k: v for k, v in message.items() if k not in ("sealed", "written")} == {
        k: v for k, v in original.items() if k not in ("sealed", "written")
    }
    expected = np.full(16, -1, np.int64)
    expected[[0, 15]] = [900, 915]
    np.testing.assert_array_equal(back.table, expected)


def test_names_of_chunks_and_records_parse_back_and_nothing_else_does():
    assert dataset_part(chunk_name(123, 45)) == (123, "45")
    assert dataset_part(record_name(123)) == (123, "dataset")
    assert is_chunk_name(record_name(123))
    for other in ("plain", ".dfab/", ".dfab/x/1", ".dfab/12/", ".dfab/12/data", "dfab/12/1", ".dfab/1/2/3"):
        assert dataset_part(other) is None, other
