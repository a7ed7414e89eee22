"""Image task stores: images stored once, tasks as indices; the folder loader; glyphs."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from distributed_maml import data
from distributed_maml.data.families import folders, glyphs
from distributed_maml.data.families.images import ImageTable
from distributed_maml.errors import StoreError

from .conftest import assert_user_error, cli_in_process, run_cli


def _png(path, seed, size=12):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size), dtype=np.uint8)).save(path)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    """alphabet/character/ folders (Omniglot's layout): 9 characters with 4 images, one with 2
    (too few for 1 shot + 2 queries), and a corrupt file."""
    root = tmp_path_factory.mktemp("omni")
    n = 0
    for a in range(2):
        for c in range(5):
            d = root / f"alpha{a}" / f"char{c}"
            d.mkdir(parents=True)
            count = 2 if (a, c) == (1, 4) else 4
            for i in range(count):
                _png(d / f"{i}.png", n)
                n += 1
    (root / "alpha0" / "char0" / "broken.png").write_bytes(b"not a png at all")
    (root / "alpha0" / "notes.txt").write_text("ignored")
    return root


def test_folder_loader_counts_skips_drops_and_rotates(image_folder):
    table, summary = folders.load(
        image_folder, 2, 1, 2, 8, "all", 0.3, 0, grayscale=True, rotations=(0, 90), class_depth=2
    )
    assert (summary.classes_found, summary.classes_used, summary.classes_dropped, summary.unreadable) == (10, 9, 1, 1)
    assert table.num_classes == 18 and table.images.shape == (9 * 4 * 2, 1, 8, 8)
    assert "alpha0/char0@90" in table.class_names and "alpha1/char4@0" not in table.class_names
    # a rotation is a new class whose images are the base class's turned by 90 degrees
    base, rot = table.class_names.index("alpha0/char1@0"), table.class_names.index("alpha0/char1@90")
    np.testing.assert_array_equal(
        table.images[table.labels == rot], np.rot90(table.images[table.labels == base], 1, axes=(2, 3))
    )
    with pytest.raises(StoreError, match="broken.png is not a readable image"):
        folders.load(image_folder, 2, 1, 2, 8, "all", 0.3, 0, grayscale=True, class_depth=2, strict=True)


def test_folder_class_splits_are_disjoint_and_seeded(image_folder):
    args = (image_folder, 2, 1, 2, 8)
    train, _ = folders.load(*args, "train", 0.4, 3, grayscale=True, class_depth=2)
    test, _ = folders.load(*args, "test", 0.4, 3, grayscale=True, class_depth=2)
    again, _ = folders.load(*args, "train", 0.4, 3, grayscale=True, class_depth=2)
    assert set(train.class_names).isdisjoint(test.class_names) and train.class_names == again.class_names
    assert len(test.class_names) >= 2
    # --val-fraction: a third set, out of train's classes; the test classes stay the same
    kw = {"grayscale": True, "class_depth": 2, "val_fraction": 0.3}
    val, _ = folders.load(*args, "val", 0.4, 3, **kw)
    train3, _ = folders.load(*args, "train", 0.4, 3, **kw)
    test3, _ = folders.load(*args, "test", 0.4, 3, **kw)
    assert test3.class_names == test.class_names and len(val.class_names) >= 2
    assert set(val.class_names) | set(train3.class_names) == set(train.class_names)
    assert set(val.class_names).isdisjoint(train3.class_names)
    with pytest.raises(StoreError, match="--classes-split val needs --val-fraction > 0"):
        folders.load(*args, "val", 0.4, 3, grayscale=True, class_depth=2)


def test_from_images_cli_summary_and_errors(image_folder, tmp_path, capsys):
    out = tmp_path / "t.arrow"
    common = ["--ways", "2", "--shots", "1", "--queries", "2", "--num-tasks", "40", "--image-size", "8", "--grayscale"]
    p = run_cli(
        "tasks",
        "build",
        "--from-images",
        image_folder,
        "--class-depth",
        "2",
        "--classes-split",
        "all",
        *common,
        "--rotations",
        "0,180",
        "--out",
        out,
    )
    assert p.returncode == 0, p.stderr
    assert "skipped 1 unreadable file(s), dropped 1 class(es)" in p.stdout and "of 18 all classes" in p.stdout
    info = run_cli("tasks", "info", out)
    assert "num_images: 72" in info.stdout and "num_classes: 18" in info.stdout
    assert_user_error(
        run_cli(
            "tasks",
            "build",
            "--from-images",
            image_folder,
            "--class-depth",
            "2",
            "--strict",
            "--classes-split",
            "all",
            *common,
            "--out",
            tmp_path / "s.arrow",
        ),
        "broken.png",
    )
    assert_user_error(
        cli_in_process(capsys, "tasks", "build", "--from-images", image_folder, *common, "--out", tmp_path / "d.arrow"),
        "--class-depth 2",
    )  # images sit two levels down
    empty = tmp_path / "empty"
    empty.mkdir()
    assert_user_error(
        cli_in_process(capsys, "tasks", "build", "--from-images", empty, *common, "--out", tmp_path / "e.arrow"),
        "holds no images",
    )
    assert_user_error(
        cli_in_process(
            capsys,
            "tasks",
            "build",
            "--from-images",
            image_folder,
            "--class-depth",
            "2",
            "--classes-split",
            "all",
            *common[:1],
            "20",
            *common[2:],
            "--out",
            tmp_path / "w.arrow",
        ),
        "too few for 20-way tasks",
    )
    assert not (tmp_path / "s.arrow").exists() and not (tmp_path / "w.arrow").exists()


def _table(n_classes=6, per_class=5, shape=(3, 6, 6), seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n_classes * per_class, *shape), dtype=np.uint8)
    return ImageTable(
        images, np.repeat(np.arange(n_classes, dtype=np.int32), per_class), tuple(f"c{i}" for i in range(n_classes))
    )


def _write(path, table, num_tasks, ways=3, shots=1, queries=2, split="train"):
    info = data.image_info("images", table, num_tasks, 0, ways, shots, queries, split)
    data.write_batches(path, info, data.generate_batches(info, table=table), overwrite=True)
    return data.TaskStore.open(path)


def test_uint8_images_round_trip_and_rows_gather_by_index(tmp_path):
    table = _table()
    s = _write(tmp_path / "s.arrow", table, 50)
    assert s.info.layout == "images" and s.images.dtype == np.uint8
    np.testing.assert_array_equal(s.images, table.images)
    np.testing.assert_array_equal(s.image_labels, table.labels)
    ids = np.array([3, 0, 49])
    rows = s.rows(ids, columns=(*data.COLUMNS[:4], "params"))
    assert rows["x_support"].shape == (3, 3, 3, 6, 6) and rows["x_query"].shape == (3, 6, 3, 6, 6)
    for t, tid in enumerate(ids):
        image_ids = s._batches[0]["image_ids"][tid]
        np.testing.assert_array_equal(rows["x_support"][t], table.images[image_ids[:3]])
        np.testing.assert_array_equal(rows["x_query"][t], table.images[image_ids[3:]])
        # every image of a task-relative label comes from the class that label stands for
        classes = rows["params"][t].astype(int)
        assert (table.labels[image_ids[:3]] == classes[rows["y_support"][t]]).all()
        assert (table.labels[image_ids[3:]] == classes[rows["y_query"][t]]).all()
        assert len(set(image_ids)) == 9  # no image twice in a task
    # the store opens from its bytes too (the object-store path)
    same = data.TaskStore.from_buffer((tmp_path / "s.arrow").read_bytes(), "buf")
    np.testing.assert_array_equal(same.rows(ids)["x_query"], rows["x_query"])


def test_task_rows_are_indices_the_file_does_not_grow_with_repeated_images(tmp_path):
    table = _table(shape=(1, 28, 28))
    small = (tmp_path / "a.arrow", 100)
    large = (tmp_path / "b.arrow", 5100)
    for path, n in (small, large):
        _write(path, table, n)
    per_task = (large[0].stat().st_size - small[0].stat().st_size) / 5000
    images_per_task = 9 * 28 * 28  # what materialising each task's pixels would cost
    assert per_task < 200 < images_per_task, per_task  # 9 int32 ids + 9 int64 labels + params


def test_corrupt_image_indices_are_a_store_error(tmp_path):
    table = _table()
    s = _write(tmp_path / "s.arrow", table, 10)
    with pytest.raises(StoreError, match="image indices outside its image table"):
        s.gather_images(np.array([[0, 1, len(table.images)]]))


def test_glyphs_are_deterministic_and_splits_disjoint():
    assert len(glyphs.class_ids("train")) >= 1000 and len(glyphs.class_ids("test")) >= 300
    assert set(glyphs.class_ids("train")).isdisjoint(glyphs.class_ids("test"))
    a = glyphs.render(np.array([5, 1300]), examples=3)
    b = glyphs.render(np.array([5, 1300]), examples=3)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (6, 1, 28, 28) and a.dtype == np.uint8 and 5 < a.mean() < 120
    # examples of a class differ (jitter), classes differ more than examples of one class
    within = np.abs(a[0].astype(float) - a[1]).mean()
    between = np.abs(a[0].astype(float) - a[3]).mean()
    assert 0 < within < between
    tr, te = glyphs.table("train"), glyphs.table("test")
    assert set(tr.class_names).isdisjoint(te.class_names) and tr.images.shape[0] == 20 * len(tr.class_names)


def test_glyph_store_through_the_cli(tmp_path):
    out = tmp_path / "g.arrow"
    p = run_cli(
        "tasks", "build", "--family", "glyphs", "--ways", "3", "--num-tasks", "20", "--split", "test", "--out", out
    )
    assert p.returncode == 0, p.stderr
    s = data.TaskStore.open(out)
    assert (s.info.ways, s.info.shots, s.info.queries, s.info.split) == (3, 1, 15, "test")
    assert s.info.num_images == 20 * glyphs.TEST_CLASSES
    assert_user_error(
        run_cli(
            "tasks",
            "build",
            "--family",
            "glyphs",
            "--shots",
            "10",
            "--queries",
            "15",
            "--num-tasks",
            "2",
            "--out",
            tmp_path / "x.arrow",
        ),
        "fewer than shots + queries = 25",
    )


def test_uint8_scaling_is_exact_and_a_from_images_store_feeds_the_network_the_hand_scaled_pngs(tmp_path):
    """Every path turns stored uint8 images into inputs through one function, so a wrong constant
    would only be compared with itself: here 0 -> 0.0 and 255 -> 1.0 exactly, and the network's
    outputs on a `--from-images` store's task equal its outputs on the same PNGs read by hand."""
    import torch

    from distributed_maml import config
    from distributed_maml.core import models
    from distributed_maml.core.maml import as_input
    from distributed_maml.execution.computer import ShardComputer

    scaled = as_input(torch.tensor([0, 1, 128, 254, 255], dtype=torch.uint8))
    assert scaled.dtype == torch.float32 and scaled[0].item() == 0.0 and scaled[-1].item() == 1.0
    assert torch.equal(scaled, torch.tensor([0, 1, 128, 254, 255], dtype=torch.float32) / 255)
    image_folder = tmp_path / "pngs"
    for c in range(3):
        (image_folder / f"class{c}").mkdir(parents=True)
        for i in range(3):
            _png(image_folder / f"class{c}" / f"{i}.png", 10 * c + i, size=16)
    out = tmp_path / "t.arrow"
    common = ["--ways", "2", "--shots", "1", "--queries", "2", "--num-tasks", "4", "--image-size", "16"]
    p = run_cli(
        "tasks", "build", "--from-images", image_folder, "--classes-split", "all", *common, "--grayscale",
        "--out", out,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    s = data.TaskStore.open(out)
    # the PNGs are 16x16 grayscale: stored unresized, so each stored image is one PNG's bytes
    by_hand = {}
    for png in sorted(image_folder.rglob("*.png")):
        pixels = np.asarray(Image.open(png).convert("L"), dtype=np.uint8)
        by_hand[pixels.tobytes()] = torch.from_numpy(pixels.astype(np.float32) / np.float32(255))[None]
    model_cfg = config.ModelConfig(name="conv4", channels=4)
    computer = ShardComputer(s, model_cfg, config.MamlConfig(inner_steps=1))
    batch = computer.batch(np.arange(2))
    net = models.functional(computer.model)
    params = dict(computer.model.named_parameters())
    raw = s.rows(np.arange(2))  # the stored uint8 images of the same tasks, to find each one's PNG
    for t in range(2):
        for images, stored in ((batch.x_support[t], raw["x_support"][t]), (batch.x_query[t], raw["x_query"][t])):
            hand = torch.stack([by_hand[np.asarray(img, dtype=np.uint8).tobytes()] for img in stored])
            assert torch.equal(images, hand)
            assert torch.equal(net(params, images), net(params, hand))


def test_an_image_folder_on_the_fly_holds_its_images_once_and_draws_episodes_from_them(image_folder, tmp_path):
    out = tmp_path / "f.arrow"
    p = run_cli(
        "tasks", "build", "--from-images", image_folder, "--class-depth", "2", "--classes-split", "all",
        "--on-the-fly", "--ways", "2:4", "--shots", "1:2", "--queries", "1", "--image-size", "8", "--grayscale",
        "--out", out,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert "drawn on the fly" in p.stdout and "36 examples" in p.stdout  # 9 classes x 4 images, once
    from distributed_maml.data import TaskStore, padding

    store = TaskStore.open(out)
    assert store.info.on_the_fly and store.info.spec.ways == (2, 4)
    pool = store.drawer.examples
    rows = store.rows(np.arange(30), data.COLUMNS)
    for t in range(30):
        one = padding.unpad(rows, t, "classification")
        ways = int(one["y_support"].max()) + 1
        assert 2 <= ways <= 4 and len(one["y_query"]) == ways
        for x, y in zip(one["x_support"], one["y_support"]):  # each image is one of its class's, in the table
            cls = int(rows["params"][t][y])
            assert any(np.array_equal(x, z) for z in pool.x[pool.labels == cls])
