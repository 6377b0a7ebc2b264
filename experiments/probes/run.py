"""Run a probe experiment from a YAML config and write its dashboard.

    python experiments/probes/run.py experiments/probes/toy.yaml
"""

import sys

from boxprobe.config import load_yaml_config
from boxprobe.report.dashboard import dashboard_from_run
from boxprobe.probing.experiment import ProbeExperiment, ProbeExperimentConfig

if __name__ == "__main__":
    run = ProbeExperiment(load_yaml_config(ProbeExperimentConfig, sys.argv[1])).run()
    print(f"wrote {dashboard_from_run(run.out_dir)}")
