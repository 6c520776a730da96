"""Dataset loaders: tiny files written in each original format, read back exactly; the errors users will meet."""

from __future__ import annotations

import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

import optstudy.data as data
from optstudy.data import _embedded, _files
from optstudy.data._files import CIFAR10_MEAN, CIFAR10_STD, crop_flip
from optstudy.errors import ConfigError
from tests.tiny_data import N_TRAIN, N_VAL, cifar_dir, idx_dir, pixels, ptb_dir, write_cifar_batch, write_idx

ROOT = Path(__file__).resolve().parents[2]
DATASETS = {**_embedded.DATASETS, **_files.DATASETS}  # the registry entries under test, called directly


def compose_data(*overrides):
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides)).data


# ------------------------------------------------------------------------------------------------------------- MNIST-1D


def test_mnist1d_is_the_packages_split_and_deterministic_per_seed():
    a, b, other = (DATASETS["mnist1d"](seed, num_samples=100) for seed in (0, 0, 1))
    assert (a.task, a.shape, a.n_classes) == ("classification", (40,), 10)
    assert (len(a.train), len(a.val)) == (80, 20)  # the package's 80/20 train_split
    x, y = a.train.tensors
    assert x.dtype == torch.float32 and x.shape == (80, 40) and y.dtype == torch.long
    assert set(y.tolist()) <= set(range(10))
    assert torch.equal(x, b.train.tensors[0]) and torch.equal(a.val.tensors[1], b.val.tensors[1])
    assert not torch.equal(x, other.train.tensors[0])


def test_mnist1d_leaves_the_global_rngs_as_they_were():
    np.random.seed(5)
    expected = np.random.rand()
    np.random.seed(5)
    _embedded._mnist1d.__wrapped__(0, 10)  # made, not taken from the process's cache
    assert np.random.rand() == expected


def test_mnist1d_is_made_once_per_process_and_training_leaves_it_as_made():
    """Kept per (seed, num_samples): a study's runs of one seed share it, so no run may change it."""
    from optstudy.config import compose as compose_train
    from optstudy.train import train

    made = DATASETS["mnist1d"](3, num_samples=200)
    assert DATASETS["mnist1d"](3, num_samples=200) is made
    before = [t.clone() for t in (*made.train.tensors, *made.val.tensors)]
    train(compose_train(["data=mnist1d", "data.num_samples=200", "seed=3", "trainer.max_epochs=1", "logger=none",
                         "checkpoint.enabled=false", "trainer.enable_progress_bar=false"]))
    assert DATASETS["mnist1d"](3, num_samples=200) is made
    assert all(torch.equal(a, b) for a, b in zip(before, (*made.train.tensors, *made.val.tensors), strict=True))


@pytest.mark.parametrize("bad", [9, 12.0, True, None])
def test_mnist1d_rejects_bad_num_samples(bad):
    with pytest.raises(ConfigError, match=r"data\.num_samples must be an integer >= 10.*got " + repr(bad)):
        DATASETS["mnist1d"](0, num_samples=bad)


# ------------------------------------------------------------------------------------------------- MNIST, Fashion-MNIST


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
@pytest.mark.parametrize("name", ["mnist", "fashion_mnist"])
def test_idx_files_round_trip(tmp_path, name, gz):
    train_images, val_images = idx_dir(tmp_path, gz)
    d = DATASETS[name](0, root=str(tmp_path))
    assert (d.task, d.shape, d.n_classes, len(d.train), len(d.val)) == ("classification", (1, 28, 28), 10, 12, 5)
    x, y = d.train[11]
    assert x.dtype == torch.float32 and x.shape == (1, 28, 28) and y.dtype == torch.long
    assert y.item() == 1  # label 11 % 10
    assert torch.equal(x[0], torch.from_numpy(train_images[11]).float() / 255)
    assert x[0, 3, 5].item() == pytest.approx(train_images[11, 3, 5] / 255)  # one known pixel, in [0, 1]
    x, y = d.val[4]
    assert torch.equal(x[0], torch.from_numpy(val_images[4]).float() / 255) and y.item() == 4


def test_idx_limit_keeps_the_first_examples_of_each_split(tmp_path):
    train_images, _ = idx_dir(tmp_path, gz=True)
    d = DATASETS["mnist"](0, root=tmp_path, limit=3)
    assert (len(d.train), len(d.val)) == (3, 3)
    assert torch.equal(d.train[2][0][0], torch.from_numpy(train_images[2]).float() / 255)
    assert len(DATASETS["mnist"](0, root=tmp_path, limit=100).val) == N_VAL  # a limit past the end


@pytest.mark.parametrize("bad", [0, -1, 2.5, True, "10"])
def test_limit_must_be_a_positive_integer_or_null(tmp_path, bad):
    idx_dir(tmp_path, gz=False)
    with pytest.raises(ConfigError, match=r"data\.limit must be a positive integer or null, got"):
        DATASETS["mnist"](0, root=tmp_path, limit=bad)


def test_idx_missing_directory_says_what_to_put_there(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigError) as e:
        DATASETS["mnist"](0, root=str(missing))
    message = str(e.value)
    assert message.startswith(f"data.root: {missing} is not a directory; mnist expects train-images-idx3-ubyte, ")
    assert "yann.lecun.com" in message and "optstudy never downloads: put them there or set data.root" in message


def test_idx_missing_file_is_named(tmp_path):
    idx_dir(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"data\.root: {where} has no t10k-labels-idx1-ubyte\(\.gz\); fashion_mnist"):
        DATASETS["fashion_mnist"](0, root=tmp_path)


def test_idx_bad_magic_number_names_the_file(tmp_path):
    idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(N_TRAIN, np.uint8), gz=False, magic=0x0D01)
    with pytest.raises(ConfigError, match=r"train-labels-idx1-ubyte is not an IDX file.*magic number 0x00000d01, "
                                          r"expected 0x00000801"):
        DATASETS["mnist"](0, root=tmp_path)


def test_idx_truncated_data_and_mismatched_labels_name_the_file(tmp_path):
    idx_dir(tmp_path, gz=False)
    path = tmp_path / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-1])
    with pytest.raises(ConfigError, match=r"t10k-images-idx3-ubyte is not an IDX file.*need 3920 bytes.*found 3919"):
        DATASETS["mnist"](0, root=tmp_path)
    idx_dir(tmp_path, gz=False)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(N_VAL + 1, np.uint8), gz=False)
    with pytest.raises(ConfigError, match=r"t10k-labels-idx1-ubyte is not the labels of .*6 labels for 5 images"):
        DATASETS["mnist"](0, root=tmp_path)


def test_idx_corrupt_gzip_names_the_file(tmp_path):
    idx_dir(tmp_path, gz=True)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ConfigError, match=r"train-images-idx3-ubyte\.gz is not a readable \(gzipped\) file"):
        DATASETS["mnist"](0, root=tmp_path)


# ----------------------------------------------------------------------------------------------------------- CIFAR-10


def normalised(image: np.ndarray) -> torch.Tensor:
    mean, std = torch.tensor(CIFAR10_MEAN).view(3, 1, 1), torch.tensor(CIFAR10_STD).view(3, 1, 1)
    return (torch.from_numpy(image).float() / 255 - mean) / std


@pytest.mark.parametrize("subdir", ["", "cifar-10-batches-py"])
def test_cifar10_batches_round_trip(tmp_path, subdir):
    train_images, val_images = cifar_dir(tmp_path / subdir)
    d = DATASETS["cifar10"](0, root=tmp_path, augment=False)
    assert (d.task, d.shape, d.n_classes, len(d.train), len(d.val)) == ("classification", (3, 32, 32), 10, 20, 4)
    x, y = d.train[9]  # data_batch_3, image 1: label (4 * 3 + 1) % 10
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and y.dtype == torch.long and y.item() == 3
    assert torch.equal(x, normalised(train_images[9]))
    # row-major channel planes: byte 1024 + 32 * 2 + 5 of a row is green (channel 1), row 2, column 5
    row = train_images[9].reshape(3072)
    assert x[1, 2, 5].item() == pytest.approx((row[1024 + 64 + 5] / 255 - CIFAR10_MEAN[1]) / CIFAR10_STD[1])
    assert [d.val[i][1].item() for i in range(4)] == [9, 8, 7, 6]
    assert torch.equal(d.val[3][0], normalised(val_images[3]))


def test_cifar10_augments_train_only_and_keeps_the_shape(tmp_path):
    train_images, val_images = cifar_dir(tmp_path)
    d = DATASETS["cifar10"](0, root=tmp_path)  # augment defaults to true
    torch.manual_seed(0)
    draws = [d.train[0][0] for _ in range(8)]
    assert all(x.shape == (3, 32, 32) and x.dtype == torch.float32 for x in draws)
    assert any(not torch.equal(x, normalised(train_images[0])) for x in draws)
    assert all(torch.equal(d.val[0][0], normalised(val_images[0])) for _ in range(8))


def test_crop_flip_is_a_window_of_the_zero_padded_image_maybe_flipped():
    image = torch.arange(1, 3 * 6 * 6 + 1, dtype=torch.uint8).view(3, 6, 6)
    padded = torch.nn.functional.pad(image, (2, 2, 2, 2))
    windows = [padded[:, t : t + 6, l : l + 6] for t in range(5) for l in range(5)]
    candidates = windows + [w.flip(-1) for w in windows]
    torch.manual_seed(0)
    seen = set()
    for _ in range(200):
        out = crop_flip(image, pad=2)
        matches = [i for i, c in enumerate(candidates) if torch.equal(out, c)]
        assert matches, "not a window of the padded image"
        seen.add(matches[0])
    assert len(seen) > 25  # offsets and flips both vary


def test_cifar10_limit(tmp_path):
    cifar_dir(tmp_path)
    d = DATASETS["cifar10"](0, root=tmp_path, limit=6)
    assert (len(d.train), len(d.val)) == (6, 4)


def test_cifar10_missing_batch_is_named(tmp_path):
    cifar_dir(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"data\.root: {where} has no data_batch_4; cifar10 expects data_batch_1, "
                                          r".*cs\.toronto\.edu.*set data\.root"):
        DATASETS["cifar10"](0, root=tmp_path)


def test_cifar10_refuses_pickles_that_would_run_code(tmp_path):
    cifar_dir(tmp_path)
    (tmp_path / "test_batch").write_bytes(pickle.dumps({b"data": print}))
    with pytest.raises(ConfigError, match=r"test_batch is not a CIFAR-10 python batch: .*refusing to load builtins"):
        DATASETS["cifar10"](0, root=tmp_path)


def test_cifar10_wrong_structure_names_the_file(tmp_path):
    cifar_dir(tmp_path)
    write_cifar_batch(tmp_path / "data_batch_2", pixels(4, (3, 32, 32), 0), [0, 1, 2])
    with pytest.raises(ConfigError, match=r"data_batch_2 is not a CIFAR-10 python batch: .*list of 4 ints in 0\.\.9"):
        DATASETS["cifar10"](0, root=tmp_path)


# --------------------------------------------------------------------------------------------------------------- PTB


def test_ptb_vocabulary_eos_and_shift(tmp_path):
    d = DATASETS["ptb"](0, root=ptb_dir(tmp_path), bptt=3)
    vocab = d.train.vocab
    # first-appearance order of the training file, <eos> after each line
    assert vocab == ("the", "cat", "sat", "<eos>", "dog", "<unk>")
    assert (d.task, d.shape, d.n_classes) == ("language_model", (), 6)
    # train stream: the cat sat <eos> the dog <unk> <eos> = 8 tokens -> (8 - 1) // 3 = 2 chunks
    x, y = d.train.tensors
    assert x.dtype == y.dtype == torch.long and x.shape == y.shape == (2, 3)
    assert x.tolist() == [[0, 1, 2], [3, 0, 4]] and y.tolist() == [[1, 2, 3], [0, 4, 5]]
    assert torch.equal(x.flatten()[1:], y.flatten()[:-1])  # y is x shifted by one token


def test_ptb_unknown_validation_words_become_unk(tmp_path):
    d = DATASETS["ptb"](0, root=ptb_dir(tmp_path), bptt=3)
    x, y = d.val[0]  # the bird sat <eos>: "bird" is not in the training file
    assert [d.val.vocab[i] for i in x.tolist()] == ["the", "<unk>", "sat"]
    assert [d.val.vocab[i] for i in y.tolist()] == ["<unk>", "sat", "<eos>"]


def test_ptb_adds_unk_when_training_has_none(tmp_path):
    (tmp_path / "ptb.train.txt").write_text("a b a b\n")
    (tmp_path / "ptb.valid.txt").write_text("a c\n")
    d = DATASETS["ptb"](0, root=tmp_path, bptt=2)
    assert d.train.vocab == ("a", "b", "<eos>", "<unk>") and d.val[0][0].tolist() == [0, 3]


def test_ptb_limit_and_bptt_rules(tmp_path):
    ptb_dir(tmp_path)
    assert len(DATASETS["ptb"](0, root=tmp_path, bptt=1, limit=2).train) == 2
    with pytest.raises(ConfigError, match=r"data\.bptt: .*ptb\.valid\.txt has 4 tokens, too few for one 4-token chunk"):
        DATASETS["ptb"](0, root=tmp_path, bptt=4)
    with pytest.raises(ConfigError, match=r"data\.bptt must be a positive integer, got 0"):
        DATASETS["ptb"](0, root=tmp_path, bptt=0)


def test_ptb_missing_file_is_named(tmp_path):
    ptb_dir(tmp_path)
    (tmp_path / "ptb.valid.txt").unlink()
    where = re.escape(str(tmp_path))
    with pytest.raises(ConfigError, match=rf"data\.root: {where} has no ptb\.valid\.txt; ptb expects .*simple-ex"):
        DATASETS["ptb"](0, root=tmp_path)


# ------------------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    ("name", "make", "overrides"),
    [
        ("mnist1d", None, ["data.num_samples=100"]),
        ("mnist", lambda root: idx_dir(root, gz=True), []),
        ("fashion_mnist", lambda root: idx_dir(root, gz=False), []),
        ("cifar10", cifar_dir, []),
        ("ptb", ptb_dir, ["data.bptt=2"]),
    ],
)
def test_config_file_keys_are_the_loader_parameters(tmp_path, name, make, overrides):
    if make is not None:
        make(tmp_path)
        overrides = [*overrides, f"data.root={tmp_path}"]
    cfg = compose_data(f"data={name}", *overrides)
    assert cfg.name == name and cfg.batch_size > 0
    d = data.load(cfg, 0)
    assert len(d.train) > 0 and len(d.val) > 0


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "ptb"])
def test_file_datasets_default_to_a_folder_of_optstudy_data(monkeypatch, tmp_path, name):
    monkeypatch.setenv("OPTSTUDY_DATA", str(tmp_path))
    assert compose_data(f"data={name}").root == f"{tmp_path}/{name}"
    monkeypatch.delenv("OPTSTUDY_DATA")
    assert compose_data(f"data={name}").root == f"data/{name}"


def test_every_loader_here_has_a_config_file_and_is_registered():
    files = {p.stem for p in (ROOT / "conf" / "data").glob("*.yaml")}
    assert set(DATASETS) <= files and set(DATASETS) <= set(data.names())
