"""Planning: a dataset's fingerprint, and a training plan fitted to it and to the GPU (``python -m seglight.plan``).

``cases`` reads one case and ``fingerprint`` the dataset; ``rules`` (spacing, mode, sizes, batch, network),
``preprocessing`` (normalisation, patch sampling) and ``schedule`` (epochs for a time budget) turn it into
decisions; ``memory`` measures or estimates what a candidate needs and ``timing`` how long its steps take (both
through the real steps of ``steps``); ``risks`` lists what a person should know first; ``settings`` holds the
options and the target, ``planner`` runs it all, ``files`` writes and reads the plan, ``report`` prints it.
"""
