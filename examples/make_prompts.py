"""Writes examples/prompts.parquet, the README's example input: a `prompt` column, some optional per-row settings
(`id`, `seed`, `num_images`, `width`, `height`) and one extra column (`category`: whether the model saw the
colour-shape pair in training) that travels to the manifest."""

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

# Captions of the shapes data set the demo model trains on (cascade/train/shapes.py): a shape, its colour, size,
# position and background. "held-out" rows ask for colour-shape pairs that data set keeps out of training.
ROWS = [
    ("red-circle", "a large red circle in the center on a white background", "held-out", None, None, None, None),
    ("green-square", "a small green square in the top left on a black background", "held-out", 7, 2, None, None),
    ("blue-diamond", "a large blue diamond in the top right on a beige background", "seen", None, None, None, None),
    ("yellow-triangle", "a small yellow triangle in the bottom right on a gray background", "seen", 3, None, 256, 256),
    ("purple-cross", "a large purple cross in the center on a black background", "held-out", 42, None, None, None),
    ("orange-square", "a small orange square in the bottom left on a white background", "seen", None, 2, None, None),
    (
        "cyan-triangle",
        "a large cyan triangle in the top left on a white background",
        "held-out",
        None,
        None,
        None,
        None,
    ),
    ("pink-circle", "a large pink circle in the bottom right on a gray background", "seen", None, None, None, None),
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
