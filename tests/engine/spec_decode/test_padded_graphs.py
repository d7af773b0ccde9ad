"""PaddedRows.fill against the layout in serval.engine.spec_decode.verify_graphs' docstring: request b's rows at
b*Q.., padding rows with token 0, slot -1 and the request's last position, seq_lens[b] = first position + Q, padding
requests of no context. A step of whole requests (every one with Q rows, the usual verify step) takes a shortcut that
must write what the padding loop writes."""
import torch

from serval.engine.spec_decode.padded_graphs import PaddedRows

Q = 3
BLOCK_SIZE = 4


def step(row_counts: list[int]) -> dict:
    """A flat step of requests with these row counts: request b's first position is 10 * (b + 1)."""
    query_start_loc, input_ids, positions, slots, seq_lens, tables = [0], [], [], [], [], []
    for b, count in enumerate(row_counts):
        first = 10 * (b + 1)
        input_ids += [100 * (b + 1) + i for i in range(count)]
        positions += list(range(first, first + count))
        slots += [1000 * (b + 1) + p for p in range(first, first + count)]
        seq_lens.append(first + count)
        tables.append([7 * (b + 1) + i for i in range(-(-(first + count) // BLOCK_SIZE))])
        query_start_loc.append(query_start_loc[-1] + count)
    return dict(query_start_loc=query_start_loc, input_ids=input_ids, positions=positions, slot_mapping=slots,
                seq_lens=seq_lens, block_tables=tables)


def expected_layout(row_counts: list[int], batch: int) -> dict[str, list[int]]:
    """The docstring's layout, written out row by row."""
    ids, positions, slots, seq_lens = [], [], [], []
    for b in range(batch):
        count = row_counts[b] if b < len(row_counts) else 0
        first = 10 * (b + 1)
        for i in range(Q):
            real = i < count
            ids.append(100 * (b + 1) + i if real else 0)
            positions.append(first + i if real else (first + count - 1 if count else 0))
            slots.append(1000 * (b + 1) + first + i if real else -1)
        seq_lens.append(first + Q if count else 0)
    return {"input_ids": ids, "positions": positions, "slot_mapping": slots, "seq_lens": seq_lens}


def filled(row_counts: list[int]) -> tuple[PaddedRows, int, list[int]]:
    rows = PaddedRows(BLOCK_SIZE, 8, 64, Q, torch.device("cpu"))
    batch = rows.batch_for(len(row_counts))
    padded_rows = rows.fill(**step(row_counts), batch=batch)
    return rows, batch, list(padded_rows)


def check(rows: PaddedRows, batch: int, row_counts: list[int]) -> None:
    for name, values in expected_layout(row_counts, batch).items():
        assert rows.view(name, len(values)).tolist() == values, name
    tables = rows.view("block_tables", batch)
    for b, table in enumerate(step(row_counts)["block_tables"]):
        assert tables[b, :len(table)].tolist() == table
    assert rows.metadata(batch).seq_lens == expected_layout(row_counts, batch)["seq_lens"]


def test_whole_requests_fill_the_layout_and_keep_their_rows():
    """Three requests of Q rows in a batch of 4 (the ladder 1, 2, 4, 8): a whole padding request after them."""
    rows, batch, padded_rows = filled([Q, Q, Q])
    assert batch == 4 and padded_rows == list(range(3 * Q))
    check(rows, batch, [Q, Q, Q])


def test_short_requests_are_padded_within():
    rows, batch, padded_rows = filled([Q, 1, 2])
    assert padded_rows == [0, 1, 2, 3, 6, 7]
    check(rows, batch, [Q, 1, 2])


def test_the_whole_request_shortcut_writes_what_the_padding_loop_writes():
    shortcut, batch, _ = filled([Q, Q])
    looped = PaddedRows(BLOCK_SIZE, 8, 64, Q, torch.device("cpu"))
    flat = step([Q, Q])
    padded_rows = looped._write_padded(looped._staging.numpy(), flat["query_start_loc"], flat["input_ids"],
                                       flat["positions"], flat["slot_mapping"], flat["seq_lens"], batch)
    assert padded_rows == list(range(2 * Q))
    for name in ("input_ids", "positions", "slot_mapping", "seq_lens"):
        length = batch if name == "seq_lens" else batch * Q
        start = looped._layout[name]
        assert shortcut._staging[start:start + length].tolist() == looped._staging[start:start + length].tolist()


def test_a_smaller_step_after_a_larger_one_reads_none_of_its_rows():
    """The copy views are made once per batch size: a batch-1 step after a batch-4 one sees only its own inputs."""
    rows = PaddedRows(BLOCK_SIZE, 8, 64, Q, torch.device("cpu"))
    rows.fill(**step([Q, Q, Q]), batch=4)
    rows.fill(**step([2]), batch=1)
    check(rows, 1, [2])
