import pickle
import urllib.error

import pytest
import torch
from torchvision.transforms import functional as TF

from vitlab import data as data_module
from vitlab.data import FOLDER, DeviceBatches, PlainDataUnpickler, load_cifar10, normalize, random_crop_flip
from vitlab.errors import VitlabError


def test_load_splits_are_disjoint_deterministic_and_80_20(cifar_root):
    data = load_cifar10(cifar_root, subset=200)
    assert data.train_images.dtype == torch.uint8 and data.train_images.shape[1:] == (3, 32, 32)
    assert len(data.train_images) == 160 and len(data.val_images) == 40
    again = load_cifar10(cifar_root, subset=200)
    assert torch.equal(data.train_images, again.train_images) and torch.equal(data.val_labels, again.val_labels)
    other = load_cifar10(cifar_root, subset=200, split_seed=1)
    assert not torch.equal(data.val_images, other.val_images)
    train_rows = {bytes(image.flatten().tolist()) for image in data.train_images}
    assert not any(bytes(image.flatten().tolist()) in train_rows for image in data.val_images)


def test_full_split_sizes_and_test_subset(cifar_root):
    data = load_cifar10(cifar_root, test_subset=50)
    total = len(data.train_images) + len(data.val_images)
    assert len(data.val_images) == round(total * 0.2)
    assert len(data.test_images) == 50


def test_finds_data_through_environment_variable(cifar_root, monkeypatch):
    monkeypatch.setenv("VITLAB_DATA", str(cifar_root))
    assert load_cifar10(None, subset=100).source.endswith(FOLDER)


def test_one_changed_byte_fails_the_checksum(writable_cifar_root):
    path = writable_cifar_root / FOLDER / "data_batch_3"
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    path.write_bytes(bytes(content))
    with pytest.raises(VitlabError, match="data_batch_3 fails its checksum"):
        load_cifar10(writable_cifar_root)


def test_missing_data_offline_is_one_clear_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.delenv("VITLAB_DATA", raising=False)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", offline)
    with pytest.raises(VitlabError, match="downloading it failed") as error:
        load_cifar10(tmp_path / "nowhere")
    assert "\n" not in str(error.value)
    with pytest.raises(VitlabError, match="not found"):
        load_cifar10(tmp_path / "nowhere", download_if_missing=False)


def test_unpickler_refuses_code(tmp_path):
    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    payload = pickle.dumps({b"data": Exploit()}, protocol=2)
    with pytest.raises(pickle.UnpicklingError, match="plain data only"):
        PlainDataUnpickler(__import__("io").BytesIO(payload), encoding="bytes").load()


def test_malicious_batch_with_matching_checksum_is_refused(writable_cifar_root, monkeypatch):
    import hashlib

    class Exploit:
        def __reduce__(self):
            return (exec, ("open('pwned', 'w').close()",))

    path = writable_cifar_root / FOLDER / "test_batch"
    path.write_bytes(pickle.dumps({b"data": Exploit(), b"labels": []}, protocol=2))
    monkeypatch.setitem(data_module.MD5, "test_batch", hashlib.md5(path.read_bytes()).hexdigest())
    with pytest.raises(VitlabError, match="cannot read CIFAR-10 file"):
        load_cifar10(writable_cifar_root)
    assert not (writable_cifar_root / "pwned").exists()


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_normalize_matches_torchvision(memory_format):
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    expected = torch.stack([TF.normalize(image.float() / 255, data_module.MEAN, data_module.STD) for image in images])
    normalized = normalize(images.contiguous(memory_format=memory_format))
    torch.testing.assert_close(normalized, expected)
    assert normalized.is_contiguous(memory_format=memory_format)  # the layout the model wants is kept


def test_random_crop_flip_takes_a_window_of_the_padded_image():
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    out = random_crop_flip(images, 4, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    saw_flip = saw_shift = False
    for index in range(16):
        matches = [(dy, dx, flip) for dy in range(9) for dx in range(9) for flip in (False, True)
                   if torch.equal(out[index], (lambda w: w.flip(2) if flip else w)(padded[index, :, dy:dy + 32, dx:dx + 32]))]
        assert matches, "every output must be a (possibly flipped) 32×32 window of the padded image"
        saw_flip |= any(flip for *_, flip in matches) and not any(not flip for *_, flip in matches)
        saw_shift |= all((dy, dx) != (4, 4) for dy, dx, _ in matches)
    assert saw_flip and saw_shift


def test_no_augmentation_is_identity():
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(random_crop_flip(images, 0, torch.Generator(), flip=False), images)


def test_device_batches_cover_each_image_once_per_epoch():
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1).expand(100, 3, 32, 32).contiguous()
    labels = torch.arange(100)
    batches = DeviceBatches(images, labels, 32, train=True, device=torch.device("cpu"), crop_padding=0, flip=False)
    assert len(batches) == 3  # the ragged last batch is dropped in training
    seen = torch.cat([y for _, y in batches])
    assert len(seen) == 96 and len(set(seen.tolist())) == 96
    evaluation = DeviceBatches(images, labels, 32, train=False, device=torch.device("cpu"))
    assert torch.equal(torch.cat([y for _, y in evaluation]), labels)
