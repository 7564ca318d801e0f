"""Measuring decoders: clocks that wait for the device, throughput of every
decoder on the same observations, agreement with the teacher's tokens, and
the tables the benchmark commands print."""
