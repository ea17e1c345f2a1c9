"""A Beam pipeline of your own that scores Parquet with vaewatch: read, score, write.

    make demo   # once: the demo's days and its registered model, under ./vaewatch-demo
    python examples/score_parquet_pipeline.py \\
        --input 'vaewatch-demo/input/dt=2026-01-02/*.parquet' --output /tmp/scored \\
        --model models:/vaewatch-demo@champion \\
        --tracking-uri sqlite:///vaewatch-demo/mlflow.db --keep record_id \\
        -- --runner DirectRunner

It uses Beam's own Parquet IO (ReadFromParquetBatched / WriteToParquetBatched, Arrow tables in
and out) around vaewatch's `ScoreRecords`, built for the model when the pipeline is built: the
model version is pinned, your schema is checked against its features, and the scored schema is
derived from it. Rows that cannot be scored go to their own files with a `reason`. `vaewatch
score` adds what this leaves out: an atomic commit with a manifest, drift statistics and
date-partitioned layout. Arguments after `--` are Beam pipeline options.
"""

from __future__ import annotations

import argparse
import sys

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.io.parquetio import ReadFromParquetBatched, WriteToParquetBatched
from apache_beam.options.pipeline_options import PipelineOptions

from vaewatch.pipeline import REJECTED_TAG, SCORED_TAG, ScoreRecords


def input_schema(pattern: str):
    """The schema of the first file the pattern matches (every file should share it)."""
    matched = [m.path for r in FileSystems.match([pattern]) for m in r.metadata_list]
    if not matched:
        raise SystemExit(f"no file matches --input {pattern!r}")
    with FileSystems.open(sorted(matched)[0]) as handle:
        return pq.read_schema(handle)


def build(pipeline: beam.Pipeline, *, input: str, output: str, model: str,
          tracking_uri: str = "", keep: list[str] = ()):  # fmt: skip
    """Attach read -> score -> write to `pipeline`; returns the two written PCollections."""
    schema = input_schema(input)
    score = ScoreRecords.for_model(model, tracking_uri, input_schema=schema, keep=list(keep))
    outputs = (
        pipeline | "Read" >> ReadFromParquetBatched(input, columns=schema.names) | "Score" >> score
    )
    scored = outputs[SCORED_TAG] | "WriteScored" >> WriteToParquetBatched(
        FileSystems.join(output, "scored"), score.scored_schema, file_name_suffix=".parquet"
    )
    rejected = outputs[REJECTED_TAG] | "WriteRejected" >> WriteToParquetBatched(
        FileSystems.join(output, "rejected"), score.rejected_schema, file_name_suffix=".parquet"
    )
    return scored, rejected


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", required=True, help="Parquet files (a glob)")
    parser.add_argument("--output", required=True, help="a folder for scored/ and rejected/")
    parser.add_argument("--model", required=True, help="models:/NAME@ALIAS or a model folder")
    parser.add_argument("--tracking-uri", default="", help="MLflow tracking URI")
    parser.add_argument("--keep", action="append", default=[], help="a column to pass through")
    args = parser.parse_args(argv[:split])
    with beam.Pipeline(options=PipelineOptions(argv[split + 1 :])) as pipeline:
        build(pipeline, input=args.input, output=args.output, model=args.model,
              tracking_uri=args.tracking_uri, keep=args.keep)  # fmt: skip


if __name__ == "__main__":
    main()
