"""Independent transcriptions of the authors' released code, one module per method, for the fidelity tests.

Each module follows its source file line by line (adapted only to take plain tensors) and cites repository, commit,
path and lines in its docstring. A reference never imports tokensieve: it is what tokensieve is compared against.
docs/fidelity.md lists every method with its reference and the differences the tests pin.
"""
