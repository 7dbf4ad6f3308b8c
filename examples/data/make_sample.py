"""Regenerate sample_logprobs.json (kept for reproducibility; the JSON is what ships).

Eight datums of ragged length, as a fine-tuning batch hands them over: per-token logprobs of
the sampled tokens (mostly between -4 and 0, a few confident tokens near 0, and a handful of
very negative outliers such as a rejected token at -143), plus Tinker-style ``weights``
(0 on the prompt tokens, 1 on the completion).
"""

import json
from pathlib import Path

import numpy as np

rng = np.random.default_rng(20261122)
datums = []
for length in (23, 41, 17, 64, 35, 52, 29, 46):
    lp = -rng.gamma(shape=0.6, scale=1.8, size=length)
    outliers = rng.choice(length, size=max(1, length // 20), replace=False)
    lp[outliers] = -rng.uniform(12.0, 150.0, size=outliers.size)
    prompt = int(rng.integers(3, length // 2))
    datums.append(
        {
            "logprobs": [round(float(v), 4) for v in lp],
            "weights": [0.0] * prompt + [1.0] * (length - prompt),
        }
    )
doc = {"description": __doc__.split("\n\n")[1].replace("\n", " "), "datums": datums}
Path(__file__).with_name("sample_logprobs.json").write_text(json.dumps(doc, indent=1) + "\n")
