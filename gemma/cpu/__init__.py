"""The CPU fast path: hand-written kernels (`kernels`, sources in `csrc/`) and their application to a loaded model
(`fastpath`), chosen per CPU. Imports nothing on its own, so `gemma.cpu.kernels` stays importable from anywhere."""
