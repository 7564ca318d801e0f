"""Command leaves of the ``fast-dvla`` CLI that are not evaluations (training,
export, recording demonstrations); the evaluation commands live in
``fast_dvla_eval``. Each module has ``add_arguments(parser)`` and ``main(args)``
and imports only the library."""
