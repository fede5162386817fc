"""Writes examples/prompts.parquet, the README's example input: a `prompt` column, some optional per-row settings
(`id`, `seed`, `num_images`, `width`, `height`) and one extra column (`category`) that travels to the manifest."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

ROWS = [
    ("red-circle", "a red circle on a blue background", "shape", None, None, None, None),
    ("green-square", "a green square in the top left corner", "shape", 7, 2, None, None),
    ("yellow-triangle", "a small yellow triangle on a white background", "shape", None, None, None, None),
    ("lighthouse", "a lighthouse at dusk, oil painting", "scene", None, None, 1024, 768),
    ("fox", "a red fox in the snow, photograph", "animal", 42, None, None, None),
    ("city", "a city skyline at night with neon lights", "scene", None, None, 768, 1024),
    ("teapot", "a blue ceramic teapot on a wooden table", "object", None, None, None, None),
    ("mountain", "snowy mountains above a lake at sunrise", "scene", None, 2, None, None),
]


def main() -> None:
    columns = list(zip(*ROWS))
    table = pa.table(
        {
            "id": pa.array(columns[0]),
            "prompt": pa.array(columns[1]),
            "category": pa.array(columns[2]),
            "seed": pa.array(columns[3], pa.int64()),
            "num_images": pa.array(columns[4], pa.int64()),
            "width": pa.array(columns[5], pa.int64()),
            "height": pa.array(columns[6], pa.int64()),
        }
    )
    pq.write_table(table, Path(__file__).with_name("prompts.parquet"))


if __name__ == "__main__":
    main()
