"""Writes scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as a Parquet table:
64 pixel columns px0..px63 and a label column `digit`. Usage: python examples/digits_table.py OUT.parquet"""

import sys

import pyarrow as pa
import pyarrow.parquet as pq
from sklearn.datasets import load_digits

digits = load_digits()
table = pa.table({**{f"px{i}": digits.data[:, i] for i in range(64)}, "digit": digits.target})
pq.write_table(table, sys.argv[1] if len(sys.argv) > 1 else "digits.parquet")
print(f"wrote {table.num_rows} digits, {table.num_columns - 1} features")
