"""Make the embedded demo model ``geolink_tiny.demo`` (``geolink/assets/geolink_tiny_demo``): train, then export.

1. Pretrain ``geolink_tiny`` (ViT-Ti/16, MiniLM tag features of width 384) with the library's trainer on the pairs
   bundled with geolink (``data="bundled"``: the five official GeoLink example tiles), seeded, on the CPU in fp32.
2. Export the whole ``GeoLinkForPretraining`` (encoders, MAE decoder, projection heads, node mask tokens and node
   predictor) with its trainable weights in float16 and a model card stating these commands and the losses.

Run from the repository root (a few minutes on a laptop CPU)::

    python examples/make_demo_model.py                     # writes runs/demo/ and geolink/assets/geolink_tiny_demo/
    python examples/make_demo_model.py --resume            # after an interruption: continues exactly (same result)
    python examples/make_demo_model.py --overwrite         # again from scratch (the old run is moved aside)
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

import geolink
from geolink.train import TrainConfig, run

EXPORT = Path(geolink.__file__).parent / "assets" / "geolink_tiny_demo"
COMMAND = "python examples/make_demo_model.py"
# the run: everything that shapes it, stated once (the model card quotes it)
RUN = {"arch": "geolink_tiny", "data": "bundled", "max_steps": 300, "batch_size": 8, "save_every": 50,
       "warmup_steps": 30, "base_lr": 1e-2, "seed": 0, "device": "cpu", "precision": "fp32"}


def loss_summary(records: list[dict], window: int = 10) -> str:
    """Mean of each loss over the first and the last ``window`` steps of a run's ``metrics.jsonl`` records."""
    first, last = records[:window], records[-window:]
    names = {"loss": "total", "loss_mae": "MAE", "loss_contrastive": "contrastive",
             "loss_consistency": "node consistency"}

    def mean(rows: list[dict], key: str) -> float:
        return sum(row[key] for row in rows) / len(rows)

    terms = ", ".join(f"{label} {mean(first, key):.3f} / {mean(last, key):.3f}" for key, label in names.items())
    return (f"{len(records)} steps × {RUN['batch_size']} samples; mean loss over the first / last {window} steps: "
            f"{terms}")


def model_card(summary: str, minutes: float) -> dict[str, str]:
    """The model card fields (see ``geolink.hub.MODEL_CARD_TEMPLATE``)."""
    settings = ", ".join(f"{key}={value!r}" for key, value in RUN.items())
    weights = f"""**What it is**: the complete `GeoLinkForPretraining` model (image encoder, OSM encoder, fusion block,
MAE decoder, contrastive projection heads, node mask tokens and node predictor) of the `geolink_tiny` architecture
(ViT-Ti/16 trunk, MiniLM tag features of width 384, fusion width 128). Trainable weights are stored in float16, the
fixed sin-cos position table in float32; geolink loads them into a float32 model. `component="fusion"` (or `"image"`,
`"osm"`) extracts an encoder.

**How it was made — exactly**: by the script `examples/make_demo_model.py` of the geolink repository, which trains
with geolink's own trainer (`geolink.train.run(TrainConfig({settings}))`, the same run as
`geolink pretrain --arch geolink_tiny --data bundled --max-steps 300 --batch-size 8 --save-every 50 --warmup-steps 30
--base-lr 1e-2 --seed 0 --device cpu --precision fp32`) and then exports this folder:

```bash
{COMMAND}
```

{summary}. The training steps took {minutes:.0f} minutes in all on the CPU it was made on (2 cores shared with
other jobs; expect a few minutes on an idle laptop).

**What it was trained on — honestly**: only the **five official GeoLink example tiles** bundled with geolink
(`geolink/assets/pairs`: five aerial image tiles with their OpenStreetMap graphs, tags embedded with
all-MiniLM-L6-v2), seen through random resized crops, flips, 90° rotations and colour jitter, from random
initialisation.

**What it is for**: the offline `geolink demo`, tests and examples. Five tiles cannot teach a foundation model:
do not expect useful features on other imagery. For real work use the official release
(`geolink_vit_large_patch16_224.neurips2025`) or pretrain on your own pairs."""
    return {
        "model_name": "geolink_tiny.demo",
        "summary": "The embedded pretrained default of geolink: a tiny GeoLink pretraining model for the offline demo.",
        "usage": "import geolink\n"
                 "model = geolink.create_model(\"geolink_tiny.demo\", pretrained=True)   # GeoLinkForPretraining\n"
                 "fusion = geolink.create_model(\"geolink_tiny.demo\", pretrained=True, component=\"fusion\")",
        "weights": weights,
        "weights_license": "MIT",
    }


def export(final: Path, out: Path, card: dict[str, str]) -> Path:
    """Save the trained model of ``final`` to ``out`` with float16 trainable weights (fixed tables stay float32)."""
    model = geolink.load_model(final)
    for parameter in model.parameters():
        if parameter.requires_grad:
            parameter.data = parameter.data.to(torch.float16)
    for name in ("README.md", "config.json", "model.safetensors"):  # save_pretrained would keep an old card
        (out / name).unlink(missing_ok=True)
    model.save_pretrained(out, model_card_kwargs=card)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run-dir", type=Path, default=Path("runs/demo"), help="training output folder")
    parser.add_argument("--out", type=Path, default=EXPORT, help="export folder")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run of --run-dir")
    parser.add_argument("--overwrite", action="store_true",
                        help="start again in a --run-dir that holds a run (the old run is moved to previous-<n>/)")
    args = parser.parse_args()
    run(TrainConfig(out=args.run_dir, resume=args.resume, overwrite=args.overwrite, **RUN))
    records = [json.loads(line) for line in (args.run_dir / "metrics.jsonl").read_text().splitlines() if line]
    minutes = sum(RUN["batch_size"] / record["samples_per_s"] for record in records) / 60
    summary = loss_summary(records)
    export(args.run_dir / "final", args.out, model_card(summary, minutes))
    size = (args.out / "model.safetensors").stat().st_size / 2**20
    print(f"{summary}\ntrained in {minutes:.1f} min; exported {args.out} ({size:.1f} MiB)")


if __name__ == "__main__":
    main()
