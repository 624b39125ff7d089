"""LoRA fine-tuning by config: base weights frozen and untouched, only adapters in the
optimizer, the loss on the data goes down, the adapter file and the grids come out."""

import json

import torch
from hydra import compose, initialize_config_dir
from torch.utils.data import default_collate
from trainutils import CONF, compose_train

from ldm.app.sample import sample
from ldm.app.train import build, train
from ldm.convert.lora import read_adapter
from ldm.nn.lora import adapter_parameters


def test_lora_finetuning_by_config(tmp_path):
    base_run = tmp_path / "base"
    train(compose_train(base_run, "trainer.max_steps=2"), base_run)
    run = tmp_path / "lora"
    cfg = compose_train(
        run,
        f"base={base_run / 'checkpoints' / 'last.ckpt'}",
        "lora=attn_ff",
        "lora.rank=8",
        "trainer.max_steps=60",
        "trainer.val_check_interval=60",
        "task.optimizer.lr=1e-2",
        "task.lr_scheduler.warmup_steps=0",
        "callbacks.checkpoint.every_n_train_steps=60",
    )
    module, data, trainer = build(cfg, run)
    trainable = [p for p in module.networks.parameters() if p.requires_grad]
    assert (
        sum(p.numel() for p in trainable)
        == sum(p.numel() for p in adapter_parameters(module.networks))
        > 0
    )  # the recipe left only the adapter trainable
    frozen = {k: v.clone() for k, v in module.networks.state_dict().items() if ".lora." not in k}
    batch = default_collate([data.dataset("train")[i] for i in range(32)])

    def probe() -> float:
        with torch.no_grad():
            generators = module._generators(batch["key"], "probe")
            return float(module.loss(batch, generators, module.networks, 0.0))

    before = probe()
    trainer.fit(module, datamodule=data)
    after = probe()
    assert after < 0.97 * before, (before, after)
    # Only the adapters trained: the optimizer holds them alone, base weights are bit-identical.
    optimized = {id(p) for group in trainer.optimizers[0].param_groups for p in group["params"]}
    assert optimized == {id(p) for p in adapter_parameters(module.networks)}
    after_state = module.networks.state_dict()
    assert all(torch.equal(after_state[k], v) for k, v in frozen.items())
    tensors, info = read_adapter(run / "adapter.safetensors")
    assert all(k.startswith("denoiser.") for k in tensors) and info["settings"]["rank"] == 8
    assert info["trainable_parameters"] == sum(v.numel() for v in tensors.values())
    legend = json.loads((run / "samples" / "grid.json").read_text())
    assert any("without the adapters" in c for c in legend["columns"])

    # The run's own checkpoint samples as the base plus its adapter file does.
    prompt = ["prompts=['a red circle']", "num_per_prompt=2", "sampler.steps=3", "image_size=16"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        own = compose("sample", overrides=[f"checkpoint={run / 'checkpoints/last.ckpt'}", *prompt])
        with_file = compose(
            "sample",
            overrides=[
                f"checkpoint={base_run / 'checkpoints' / 'last.ckpt'}",
                f"adapters=[{run / 'adapter.safetensors'}]",
                *prompt,
            ],
        )
    a, b = sample(own, tmp_path / "own"), sample(with_file, tmp_path / "file")
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]
