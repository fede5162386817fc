"""The pipeline's rows: which columns make a request, and setting columns on an Arrow batch.

Free of torch, so the writer tasks, which need only these, start without loading the model code.
"""

from __future__ import annotations

import pyarrow as pa

from cascade.request import Request

REQUEST_FIELDS = ("prompt", "negative_prompt", "seed", "width", "height", "prior_steps", "prior_cfg")
REQUEST_FIELDS += ("decoder_steps", "decoder_cfg", "sampler")


def request_of(row: dict) -> Request:
    return Request(**{k: row[k] for k in REQUEST_FIELDS})


def requests_of(rows: list[dict]) -> list[Request]:
    return [request_of(row) for row in rows]


def set_columns(table: pa.Table, columns: dict[str, pa.Array]) -> pa.Table:
    for name, values in columns.items():
        if name in table.column_names:
            table = table.set_column(table.column_names.index(name), name, values)
        else:
            table = table.append_column(name, values)
    return table
