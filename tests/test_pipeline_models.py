"""Every model returns (features, logits) of the right shapes."""
import pytest
import torch

from gacd_fast.distill.models import MODELS, build_model


@pytest.mark.parametrize("name,size", [("small_cnn_teacher", 8), ("small_cnn_student", 8),
                                       ("small_cnn_teacher_stride2", 28), ("small_cnn_student_stride2", 28)])
def test_small_cnns(name, size):
    m = build_model(name, 10, 1).eval()
    f, logits = m(torch.rand(3, 1, size, size))
    assert f.shape == (3, m.feature_dim) and logits.shape == (3, 10)


def test_teacher_wider_than_student():
    assert build_model("small_cnn_teacher", 10, 1).feature_dim > build_model("small_cnn_student", 10, 1).feature_dim


@pytest.mark.parametrize("name,dim", [("resnet18", 512), ("preact_resnet18", 512), ("mobilenetv2", 1280), ("wrn_34_10", 640)])
def test_cifar_models(name, dim):
    torch.manual_seed(0)
    m = build_model(name, 7, 3).eval()
    batch = 1 if name == "wrn_34_10" else 2  # WRN-34-10 is 46M parameters: one image keeps the test fast
    with torch.no_grad():
        f, logits = m(torch.rand(batch, 3, 32, 32))
    assert f.shape == (batch, dim) == (batch, m.feature_dim) and logits.shape == (batch, 7)
    assert torch.isfinite(logits).all()


def test_registry_and_bad_name():
    assert set(MODELS) >= {"resnet18", "preact_resnet18", "wrn_34_10", "mobilenetv2"}
    with pytest.raises(ValueError, match="model must be one of"):
        build_model("vgg", 10, 3)


def test_gradients_flow_in_train_mode():
    m = build_model("resnet18", 10, 3).train()
    f, logits = m(torch.rand(2, 3, 32, 32))
    logits.sum().backward()
    assert m.conv1.weight.grad is not None
