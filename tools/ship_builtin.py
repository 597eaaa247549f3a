"""Copy a trained built-in model into the package and record its SHA-256 digests.

    python tools/ship_builtin.py /tmp/builtin/step1500

Copies builtin.FILES from the folder into raymoe/model/builtin_model/ and rewrites the
SHIPPED_SHA256 table in raymoe/model/builtin.py, which builtin_model_path() checks on every load.
Run it once, for the final weights: every committed version stays in git history.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from raymoe.model import builtin  # noqa: E402


def main() -> None:
    src = Path(sys.argv[1])
    dest = ROOT / "raymoe" / "model" / builtin.PACKAGE_FOLDER
    dest.mkdir(exist_ok=True)
    digests = {}
    for name in builtin.FILES:
        shutil.copyfile(src / name, dest / name)
        digests[name] = hashlib.sha256((dest / name).read_bytes()).hexdigest()
    table = "SHIPPED_SHA256 = {\n" + "".join(f'    "{k}": "{v}",\n' for k, v in digests.items()) + "}\n"
    code = ROOT / "raymoe" / "model" / "builtin.py"
    text, count = re.subn(r"SHIPPED_SHA256 = \{\n(?:    .*\n)*\}\n", table, code.read_text())
    if count != 1:
        raise SystemExit("SHIPPED_SHA256 table not found in builtin.py")
    code.write_text(text)
    print(table, end="")


if __name__ == "__main__":
    main()
