"""Parquet inputs (paths, directories, globs, fingerprints) and streamed training data."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from vaewatch.model.data.features import FeatureSpec
from vaewatch.model.data.inputs import InputError, ParquetSource, input_containing, resolve_files
from vaewatch.model.data.training_data import TrainingData, row_uniforms
from vaewatch.model.network.vae import VAE, VAEConfig
from vaewatch.model.synthetic import LABEL_COLUMNS, transactions
from vaewatch.model.training.loop import TrainConfig, train


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("tree")
    for day in ("dt=2026-01-01", "dt=2026-01-02"):
        for part in range(2):
            path = root / day / f"part-{part}.parquet"
            path.parent.mkdir(parents=True, exist_ok=True)
            pq.write_table(pa.table({"v": [float(part)] * 10}), path)
    (root / "_rejected").mkdir()
    pq.write_table(pa.table({"v": [1.0]}), root / "_rejected" / "part-0.parquet")
    (root / ".beam-temp").mkdir()
    (root / ".beam-temp" / "x.parquet").write_bytes(b"not parquet")
    (root / "_SUCCESS").write_text("")
    (root / "notes.txt").write_text("not data")
    return root


def _names(files, root):
    return [f.path[len(root.as_posix()) + 1 :] for f in files]


def test_directory_glob_and_file(tree):
    _, files = resolve_files(str(tree))
    assert _names(files, tree) == [
        "dt=2026-01-01/part-0.parquet",
        "dt=2026-01-01/part-1.parquet",
        "dt=2026-01-02/part-0.parquet",
        "dt=2026-01-02/part-1.parquet",
    ]  # sorted; _rejected, .beam-temp, _SUCCESS and notes.txt skipped
    _, files = resolve_files(str(tree / "dt=*" / "part-1.parquet"))
    assert _names(files, tree) == ["dt=2026-01-01/part-1.parquet", "dt=2026-01-02/part-1.parquet"]
    _, files = resolve_files(str(tree / "**" / "part-0.parquet"))
    assert len(files) == 3  # ** reaches into _rejected when asked explicitly
    _, files = resolve_files(str(tree / "dt=2026-01-02" / "part-0.parquet"))
    assert len(files) == 1 and files[0].size > 0 and files[0].modified


def test_nothing_matched_and_missing_paths_are_clear(tree):
    with pytest.raises(InputError, match="matched no Parquet files"):
        resolve_files(str(tree / "*.parquet"))
    with pytest.raises(InputError, match="does not exist"):
        resolve_files(str(tree / "nope" / "*.parquet"))
    with pytest.raises(InputError, match="does not exist"):
        resolve_files(str(tree / "missing.parquet"))


def test_fingerprint_tracks_content_and_rows(tmp_path):
    pq.write_table(pa.table({"v": [1.0, 2.0]}), tmp_path / "a.parquet")
    first = ParquetSource(str(tmp_path)).fingerprint()
    assert first.rows == 2 and first.total_bytes > 0 and len(first.digest) == 16
    assert ParquetSource(str(tmp_path)).fingerprint() == first
    pq.write_table(pa.table({"v": [1.0, 2.0, 3.0]}), tmp_path / "a.parquet")
    second = ParquetSource(str(tmp_path)).fingerprint()
    assert second.rows == 3 and second.digest != first.digest


def test_row_ordinals_do_not_depend_on_read_order(tree):
    source = ParquetSource(str(tree))
    forward = {first: b.num_rows for first, b in source.batches(batch_rows=3)}
    backward = {
        first: b.num_rows for first, b in source.batches(batch_rows=3, file_order=[3, 2, 1, 0])
    }
    assert forward == backward and sum(forward.values()) == 40 and min(forward) == 0


def test_row_uniforms_are_uniform_and_seeded():
    u = row_uniforms(np.arange(200_000), seed=1)
    assert 0.0 <= u.min() and u.max() < 1.0
    assert abs(u.mean() - 0.5) < 0.005 and abs(np.mean(u < 0.1) - 0.1) < 0.003
    assert not np.array_equal(u, row_uniforms(np.arange(200_000), seed=2))
    np.testing.assert_array_equal(u[1000:2000], row_uniforms(np.arange(1000, 2000), seed=1))


@pytest.fixture(scope="module")
def parquet_days(tmp_path_factory):
    root = tmp_path_factory.mktemp("days")
    for i in range(4):
        table = transactions(2_500, anomaly_rate=0.0, seed=10 + i, first_id=i * 2_500)
        pq.write_table(
            table.drop_columns(LABEL_COLUMNS), root / f"part-{i}.parquet", row_group_size=700
        )
    source = ParquetSource(str(root))
    spec = FeatureSpec.fit(b for _, b in source.batches())
    return source, spec


def _rows(x, m):
    return sorted(map(tuple, torch.cat([x, m.float()], dim=1).tolist()))


def test_streamed_epoch_serves_exactly_the_cached_training_rows(parquet_days):
    source, spec = parquet_days
    cached = TrainingData.from_parquet(source, spec, validation_fraction=0.2, seed=3)
    streamed = TrainingData.from_parquet(
        source,
        spec,
        validation_fraction=0.2,
        seed=3,
        cache_bytes=0,
        shuffle_buffer_rows=1000,
        read_batch_rows=300,
    )
    assert cached.cached and not streamed.cached
    assert cached.counts == streamed.counts and cached.counts.rows_read == 10_000
    assert torch.equal(cached.x_val, streamed.x_val)  # the split is by row, not by batch
    generator = torch.Generator().manual_seed(0)
    batches = list(streamed.batches(128, generator))
    assert all(x.shape[0] == 128 for x, _ in batches[:-1])
    x = torch.cat([b[0] for b in batches])
    m = torch.cat([b[1] for b in batches])
    assert x.shape[0] == cached.counts.rows_train
    assert _rows(x, m) == _rows(cached._x, cached._m)
    # two epochs see the rows in different orders
    again = torch.cat([b[0] for b in streamed.batches(128, generator)])
    assert not torch.equal(again, x)


def test_validation_sample_is_capped_by_seeded_subsampling(parquet_days):
    source, spec = parquet_days
    data = TrainingData.from_parquet(
        source, spec, validation_fraction=0.2, seed=3, max_validation_rows=500
    )
    c = data.counts
    assert 1_900 < c.rows_held_out < 2_100 and 420 < c.rows_validation < 580
    assert c.rows_train + c.rows_held_out + c.rows_unusable == c.rows_read


def test_training_from_a_stream_is_deterministic_and_learns(parquet_days):
    source, spec = parquet_days

    def fit():
        data = TrainingData.from_parquet(
            source, spec, validation_fraction=0.1, seed=0, cache_bytes=0, shuffle_buffer_rows=2048
        )
        model = VAE(VAEConfig.for_spec(spec, hidden=[32, 32]))
        return model, train(model, data, config=TrainConfig(epochs=4, seed=0, device="cpu"))

    m1, r1 = fit()
    m2, r2 = fit()
    assert all(
        torch.equal(a, b)
        for a, b in zip(m1.state_dict().values(), m2.state_dict().values(), strict=True)
    )
    vals = [h.val_elbo for h in r1.history]
    assert vals == [h.val_elbo for h in r2.history]
    assert vals[-1] > vals[0] + 1.0, vals


@pytest.mark.parametrize(
    "inputs, output, found",
    [
        ("in", "in/out", "in"),  # a directory lists every visible *.parquet below it
        ("in", "in", "in"),
        ("in/", "in/a/b", "in/"),
        ("in", "other", None),
        ("in", "in2/out", None),  # a prefix of the name is not a parent
        ("in", "in/_scores", None),  # hidden from directory listings
        ("in", "in/.scores", None),
        ("in/*.parquet", "in/out", None),  # one level: the output's files are one deeper
        ("in/*/*.parquet", "in/out", "in/*/*.parquet"),
        ("in/**/*.parquet", "in/a/b", "in/**/*.parquet"),
        (["elsewhere", "in"], "in/x", "in"),
        ("s3://lake/in", "s3://lake/in/scores", "s3://lake/in"),
        ("s3://lake/in", "s3://lake/scores", None),
        ("data/dt=2026-01-05", "data/dt=2026-01-05", "data/dt=2026-01-05"),  # one root for both
    ],
)
def test_an_output_the_input_would_list_is_found(tmp_path, monkeypatch, inputs, output, found):
    monkeypatch.chdir(tmp_path)
    assert input_containing(inputs, output) == found


def test_excluding_leaves_out_the_same_rows_cached_and_streamed(parquet_days):
    """`excluding(predicate)` serves every training row but those the predicate names, from
    memory and from the stream alike, and counts them; validation rows stay."""
    source, spec = parquet_days
    kwargs = dict(validation_fraction=0.2, seed=3)
    cached = TrainingData.from_parquet(source, spec, **kwargs)
    streamed = TrainingData.from_parquet(
        source, spec, **kwargs, cache_bytes=0, shuffle_buffer_rows=1000, read_batch_rows=300
    )
    amount = spec.names().index("amount")
    cut = float(torch.quantile(cached._x[:, amount], 0.9))

    def large(x, mask):
        return (x[:, amount] > cut) & mask[:, amount]

    n = len(spec.names())  # a row of _rows: the n values, then the n observed flags
    expected = [r for r in _rows(cached._x, cached._m) if r[amount] <= cut or not r[n + amount]]
    for data in (cached, streamed):
        kept = data.excluding(large)
        batches = list(kept.batches(128, torch.Generator().manual_seed(0)))
        x = torch.cat([b[0] for b in batches])
        m = torch.cat([b[1] for b in batches])
        assert _rows(x, m) == expected
        assert kept.excluded_rows == cached.counts.rows_train - len(expected) > 0
        assert torch.equal(kept.x_val, cached.x_val) and kept.counts == cached.counts
    assert cached.excluded_rows == 0 and cached._x.shape[0] == cached.counts.rows_train
