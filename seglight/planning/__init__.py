"""Planning: a dataset's fingerprint, and a training plan fitted to it and to the GPU (``python -m seglight.plan``).

``cases`` reads one case, ``fingerprint`` the dataset; ``rules`` turns a fingerprint into decisions, ``memory``
and ``timing`` measure (or estimate) what a candidate costs, ``risks`` lists what a person should know first,
``planner`` runs it all and ``files`` writes and reads the plan; ``report`` prints both.
"""
