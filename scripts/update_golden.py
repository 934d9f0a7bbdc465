"""Regenerate tests/assets/golden_losses.json on purpose (after a deliberate change of the numerics).

    python scripts/update_golden.py

Runs train.py with the overrides stored in the golden file (or the defaults below) and records its losses.
Exit status: 0 written, 1 train.py failed (its message is printed above; the golden file is left unchanged).
"""

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from anywhere without installing
from acestep_ft.errors import UserError, reported_errors  # noqa: E402

GOLDEN = ROOT / "tests" / "assets" / "golden_losses.json"
DEFAULT_OVERRIDES = ["hardware=cpu", "train.max_steps=12", "train.save_every=6", "dataset.num_samples=8"]


def main() -> None:
    overrides = json.loads(GOLDEN.read_text())["overrides"] if GOLDEN.exists() else DEFAULT_OVERRIDES
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run([sys.executable, "train.py", f"hydra.run.dir={tmp}", *overrides], cwd=ROOT)
        if proc.returncode != 0:
            raise UserError(f"train.py {' '.join(overrides)} exited with status {proc.returncode} (its message is "
                            f"above); {GOLDEN.relative_to(ROOT)} is unchanged.")
        lines = (Path(tmp) / "metrics.jsonl").read_text().splitlines()
        losses = [json.loads(line)["train/loss"] for line in lines if line.strip()]
    GOLDEN.write_text(json.dumps({"overrides": overrides, "losses": losses}, indent=1) + "\n")
    print(f"wrote {len(losses)} losses to {GOLDEN.relative_to(ROOT)}: {losses[0]:.5f} -> {losses[-1]:.5f}")


if __name__ == "__main__":
    with reported_errors():  # the message only, no traceback
        main()
