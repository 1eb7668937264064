import pytest
import torch

from vitlab.train.mixing import MixedBatch, cutmix_box, mix_batch


def batch(count=8):
    images = torch.arange(count, dtype=torch.float32).view(count, 1, 1, 1).expand(count, 3, 32, 32).contiguous()
    return images, torch.arange(count)  # image k is the constant k, labelled k


def test_switched_off_it_returns_the_batch_and_draws_nothing():
    images, labels = batch()
    generator = torch.Generator().manual_seed(0)
    state = generator.get_state()
    mixed = mix_batch(images, labels, 0.0, 0.0, generator)
    assert mixed.images is images and mixed.weight == 1.0 and torch.equal(generator.get_state(), state)


def test_mixup_blends_each_image_with_its_neighbour_by_the_weight():
    images, labels = batch()
    mixed = mix_batch(images, labels, 0.8, 0.0, torch.Generator().manual_seed(3))
    assert 0.0 < mixed.weight < 1.0
    expected = labels.float() * mixed.weight + labels.roll(1).float() * (1 - mixed.weight)  # (B,)
    torch.testing.assert_close(mixed.images[:, 0, 0, 0], expected)
    assert torch.equal(mixed.partner_labels, labels.roll(1))


def test_cutmix_pastes_a_box_whose_area_is_the_partner_share():
    images, labels = batch()
    for seed in range(20):
        mixed = mix_batch(images, labels, 0.0, 1.0, torch.Generator().manual_seed(seed))
        from_partner = (mixed.images[:, 0] == labels.roll(1).float().view(-1, 1, 1)).float().mean(dim=(1, 2))  # (B,)
        # every image gets the same box from its partner (image 0's is image 7)
        torch.testing.assert_close(from_partner, torch.full((8,), 1.0 - mixed.weight))
        assert mixed.images.is_contiguous() and torch.equal(images[:, 0, 0, 0], labels.float())  # the input is untouched


def test_cutmix_box_stays_inside_the_image():
    generator = torch.Generator().manual_seed(0)
    for weight in (0.0, 0.3, 0.9, 1.0):
        top, bottom, left, right = cutmix_box(32, 32, weight, generator)
        assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32


def test_the_same_generator_state_gives_the_same_mix():
    images, labels = batch()
    first = mix_batch(images, labels, 0.8, 1.0, torch.Generator().manual_seed(5))
    second = mix_batch(images, labels, 0.8, 1.0, torch.Generator().manual_seed(5))
    assert first.weight == second.weight and torch.equal(first.images, second.images)


@pytest.mark.parametrize("weight, dominant", [(0.7, "labels"), (0.3, "partner_labels")])
def test_accuracy_counts_the_class_that_covers_most_of_the_image(weight, dominant):
    images, labels = batch()
    mixed = MixedBatch(images, labels, labels.roll(1), weight)
    assert torch.equal(mixed.dominant_labels, getattr(mixed, dominant))
