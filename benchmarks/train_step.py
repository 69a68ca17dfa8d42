"""The CP training step, naive vs cpwb path, side by side (the same as `cpwb bench`; options: --help).

    OMP_NUM_THREADS=1 python benchmarks/train_step.py --repeats 10 --check-nll          # CPU, default model
    python benchmarks/train_step.py --shape mistral-7b --anchors 6 --positives 5 --negatives 5 --lora-r 64 \
        --peak-tflops 790                                                               # one H100
"""
from cpwb.app.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
