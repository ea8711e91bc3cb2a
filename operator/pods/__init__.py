"""The Kubernetes children of one stage run, as plain dicts (unit-tested without a cluster), one concern a
module: ``run`` (what is being run), ``staging`` (volumes and hf:// stage-input init containers),
``distributed`` (ranks, torchrun rendezvous, the headless Service), ``hardening`` (security contexts),
``resources`` (requests, limits, /dev/shm, extended resources) and ``job`` (the ConfigMap and the Job that
puts them together). How many pods and processes a kind gets comes from operator/launch_profile.py."""
