"""The evaluation commands of ``fast-dvla`` (benchmarks and studies), one module each with
``add_arguments(parser)`` and ``main(args)``. They import the library, never each other."""
