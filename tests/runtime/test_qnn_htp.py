"""The qnn-htp provider: onnxruntime-qnn's plugin EP on the (x86_64-emulated) HTP backend, CPU fallback disabled.

What the bundle graphs do on it is measured in docs/qnn_htp.md; here: the provider registers, a small QDQ conv model
runs entirely on the HTP and matches the CPU EP, and every failure is one line.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from onnx import TensorProto, helper

from qdq_graphs import quantized_conv, save_graph

from cw_export.cli import main
from cw_export.errors import BundleError, InputError
from cw_export.parity.measure import sqnr_db
from cw_export.runtime.sessions import QNN_EP, create_session, qnn_devices, session_config

# measured 45.0 dB HTP vs the CPU EP on the same QDQ graph, 39.2 dB HTP vs FP32 (CPU QDQ vs FP32: 39.3 dB)
MIN_SQNR_VS_CPU_DB = 40.0
MIN_SQNR_VS_FP32_DB = 35.0


@pytest.fixture(scope="module")
def conv_models(tmp_path_factory):
    """(FP32 conv + relu, its static QDQ with onnxruntime's QNN config, calibration inputs)."""
    return quantized_conv(tmp_path_factory.mktemp("qnn"), "conv_qdq.onnx")


def test_provider_registers_once_and_lists_qnn_devices():
    devices, backend = qnn_devices()
    again, _ = qnn_devices()  # a second call must not register the library again (onnxruntime would refuse)
    assert devices and all(d.ep_name == QNN_EP for d in devices)
    assert len(again) == len(devices)
    assert Path(backend).name == "libQnnHtp.so" and Path(backend).is_file()


def test_qdq_conv_runs_entirely_on_htp_and_matches_cpu(conv_models):
    fp32, qdq, data = conv_models
    htp = create_session(qdq, "qnn-htp", config=session_config("basic"), precision="w8a8")
    assert htp.get_providers()[0] == QNN_EP
    assert htp.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    cpu = create_session(qdq, config=session_config("basic"))
    ref = create_session(fp32)
    for x in data[:2]:
        (actual,), (quantized,), (expected,) = (s.run(["y"], {"x": x}) for s in (htp, cpu, ref))
        assert sqnr_db(quantized, actual) >= MIN_SQNR_VS_CPU_DB
        assert sqnr_db(expected, actual) >= MIN_SQNR_VS_FP32_DB
        assert sqnr_db(quantized, actual) < 200.0  # really ran on another backend: not bit-exact with the CPU EP


def test_fp32_graph_stays_on_cpu(conv_models):
    fp32, _, data = conv_models
    session = create_session(fp32, "qnn-htp", precision="fp32")
    assert session.get_providers() == ["CPUExecutionProvider"]


def test_graph_that_cannot_be_placed_is_one_line_naming_graph_and_ops(tmp_path):
    path = save_graph([helper.make_node("Det", ["x"], ["d"]), helper.make_node("Relu", ["d"], ["y"])],
                 [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 3])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])], [], tmp_path / "low_res.onnx")
    with pytest.raises(BundleError) as info:
        create_session(path, "qnn-htp", precision="w8a16")
    message = str(info.value)
    assert "\n" not in message
    assert message == "graph low_res cannot run fully on qnn-htp: unsupported op types Det"


def test_unknown_provider_is_one_line(tmp_path, capsys):
    with pytest.raises(InputError, match=r"^unknown provider 'gpu'; available: cpu, qnn-htp$"):
        create_session(tmp_path / "missing.onnx", "gpu")
    (tmp_path / "bundle").mkdir()
    code = main(["run", str(tmp_path / "bundle"), "--prompt", "a cat", "--seed", "0", "--latents-out",
                 str(tmp_path / "l.npy"), "--provider", "npu"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1 and "unknown provider 'npu'" in err
    code = main(["validate", str(tmp_path), "--provider", "npu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "unknown provider 'npu'" in err
