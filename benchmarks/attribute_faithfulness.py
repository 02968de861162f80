"""Faithfulness of the CAM boxes (issue 5, thesis B 6): the attribute's loss on the photo, with
the box of its Grad-CAM blanked, and with a same-size random box blanked; per attribute and
over all labeled pairs of the run's ``test`` part; JSON out.

    python benchmarks/attribute_faithfulness.py runs/attributes/best [--cam-of label|prediction]
"""

from __future__ import annotations

import argparse
import sys
import time

from _common import emit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("--split", default="test")
    parser.add_argument("--cam-of", default="label", choices=["label", "prediction"])
    parser.add_argument("--box-threshold", type=float, default=0.5)
    parser.add_argument("--limit", type=int, default=None, help="the first N images of the part only")
    args = parser.parse_args()

    from fashionlens.explain.explainer import AttributeExplainer
    from fashionlens.explain.faithfulness import faithfulness
    from fashionlens.training.attribute_task import load_attribute_run, read_config_data

    model, cfg, _ = load_attribute_run(args.model)
    data, parts = read_config_data(cfg)
    part = data.subset(parts[args.split][:args.limit])
    explainer = AttributeExplainer(model, cfg.loss, args.box_threshold)
    t0 = time.time()
    report = lambda n, total: print(f"{n}/{total} images", file=sys.stderr, flush=True) if n % 25 == 0 else None  # noqa: E731
    result = faithfulness(explainer, part.images, part.targets, part.mask, cam_of=args.cam_of, progress=report)
    emit({"benchmark": "attribute_faithfulness", "model": args.model, "split": args.split,
          "images": len(part.images), "box_threshold": args.box_threshold, "seconds": round(time.time() - t0, 1),
          **result})


if __name__ == "__main__":
    main()
