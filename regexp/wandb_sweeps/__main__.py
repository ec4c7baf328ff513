"""`python -m regexp.wandb_sweeps [NAME...]`: the path of each named shipped W&B sweep config
(all of them without a name), e.g. `wandb sweep $(python -m regexp.wandb_sweeps lr_wd_random)`."""

import sys

from regexp.wandb_sweeps import sweep_configs


def main(names: list[str]) -> int:
    configs = sweep_configs()
    unknown = [n for n in names if n not in configs]
    if unknown:
        print(f"regexp: error: no W&B sweep config {unknown[0]!r}; shipped: {', '.join(configs)}", file=sys.stderr)
        return 2
    for name in names or configs:
        print(configs[name])
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
