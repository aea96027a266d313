"""The `mor-lm-eval` console script, apart from the adapter (lm_eval.py), which imports torch and the model code.

lm-eval's parser runs here first, on the arguments the adapter's command line will see: `--help` and bad flags
end before torch loads. Then lm_eval.cli runs lm-eval's command line with `--model mor` registered. Also
`python -m mor_pretrain.integrations.lm_eval_cli`.
"""

from __future__ import annotations

import sys

from mor_pretrain.integrations import LOCAL_TASKS


def main() -> None:
    from lm_eval._cli import HarnessCLI  # the parser alone: lm_eval.__main__ also imports numpy and requests

    if not any(a.startswith("--include_path") for a in sys.argv):
        sys.argv += ["--include_path", str(LOCAL_TASKS)]
    HarnessCLI().parse_args()  # exits on --help or a usage error
    from mor_pretrain.integrations.lm_eval import cli  # after parsing: torch loads only now

    cli()


if __name__ == "__main__":
    main()
