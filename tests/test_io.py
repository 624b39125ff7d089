"""ldm.io: formats told apart by their bytes, and one line naming the file for every kind
of bad file (missing, empty, truncated, corrupt, code-carrying)."""

import os
import pickle

import pytest
import torch

from ldm.io import (
    WeightsFileError,
    atomic_write,
    read_metadata,
    read_pickle,
    read_safetensors,
    read_weights,
    save_safetensors,
    sniff,
)


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch /tmp/ldm_io_pwned",))


def _good(tmp_path):
    tensors = {"w": torch.arange(6.0).view(2, 3), "b": torch.ones(3)}
    save_safetensors(tmp_path / "good.safetensors", tensors, {"note": "hi"})
    torch.save({"state_dict": tensors, "step": 3}, tmp_path / "good.ckpt")
    return tensors


def _bad_files(tmp_path) -> dict[str, tuple[object, str]]:
    """name -> (path, what the message must say)."""
    _good(tmp_path)
    full = (tmp_path / "good.safetensors").read_bytes()
    ckpt = (tmp_path / "good.ckpt").read_bytes()
    files = {
        "empty.safetensors": (b"", "is empty"),
        "cut.safetensors": (full[: len(full) // 2], "truncated safetensors"),
        "header.safetensors": (full[:8] + b"{not json" + full[17:], "corrupt safetensors"),
        "cut.ckpt": (ckpt[: len(ckpt) // 2], "truncated or corrupt checkpoint"),
        "noise.bin": (bytes(range(7, 200)), "not a safetensors file, a torch checkpoint"),
        "evil.ckpt": (pickle.dumps({"w": _Exploit()}, protocol=2), "could run code"),
    }
    for name, (data, _) in files.items():
        (tmp_path / name).write_bytes(data)
    files["missing.ckpt"] = (None, "no weights file at")
    return {name: (tmp_path / name, say) for name, (_, say) in files.items()}


def test_good_files_read_back_by_their_bytes_not_their_names(tmp_path):
    tensors = _good(tmp_path)
    os.replace(tmp_path / "good.ckpt", tmp_path / "renamed.safetensors")
    assert sniff(tmp_path / "good.safetensors") == "safetensors"
    assert sniff(tmp_path / "renamed.safetensors") == "torch"
    for name in ("good.safetensors", "renamed.safetensors"):
        read = read_weights(tmp_path / name)
        assert read.keys() == tensors.keys() and torch.equal(read["w"], tensors["w"])
    assert read_safetensors(tmp_path / "good.safetensors")[1] == {"note": "hi"}
    assert read_metadata(tmp_path / "renamed.safetensors") == {}
    assert read_pickle(tmp_path / "renamed.safetensors")["step"] == 3
    (tmp_path / "pipe").mkdir()
    (tmp_path / "pipe" / "model_index.json").write_text("{}")
    assert sniff(tmp_path / "pipe") == "diffusers"


@pytest.mark.parametrize(
    "name", ["empty.safetensors", "cut.safetensors", "header.safetensors", "cut.ckpt",
             "noise.bin", "evil.ckpt", "missing.ckpt"],
)  # fmt: skip
def test_every_bad_file_is_one_line_naming_it(tmp_path, name):
    path, say = _bad_files(tmp_path)[name]
    for read in (read_weights, read_metadata) if name.endswith("safetensors") else (read_weights,):
        with pytest.raises(WeightsFileError) as caught:
            read(path)
        message = str(caught.value)
        assert str(path) in message and say in message, message
        assert "\n" not in message and "weights_only=False" not in message
    assert not os.path.exists("/tmp/ldm_io_pwned")  # the code never ran


def test_atomic_write_leaves_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.bin"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic_write(target) as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("crash")
    assert target.read_bytes() == b"old" and list(tmp_path.iterdir()) == [target]
    with atomic_write(target) as tmp:
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new" and list(tmp_path.iterdir()) == [target]


def test_the_refusal_names_what_the_pickle_would_have_called(tmp_path):
    _bad_files(tmp_path)
    with pytest.raises(WeightsFileError, match=r"\(it names posix\.system\)"):
        read_pickle(tmp_path / "evil.ckpt")


def test_legacy_names_move_the_old_unet_to_the_denoiser():
    """Checkpoints, adapters and post-hoc EMA snapshots from before session 6."""
    from ldm.io import legacy_names

    old = ["networks.unet.out.2.weight", "ema.average.unet.out.2.weight", "unet.a.lora_down"]
    old += ["0/unet.out.2.weight", "networks.conditioner.w", "vae.decoder.conv_in.weight"]
    got = list(legacy_names(dict.fromkeys(old)))
    assert got == [
        "networks.denoiser.out.2.weight",
        "ema.average.denoiser.out.2.weight",
        "denoiser.a.lora_down",
        "0/denoiser.out.2.weight",
        "networks.conditioner.w",
        "vae.decoder.conv_in.weight",
    ]
