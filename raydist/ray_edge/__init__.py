"""The Ray edge: the only package that imports Ray (inside functions in the modules the commands load at
import, so bad input still exits 2 before Ray loads). session (connect, log forwarding, ports, tokens),
planning (capacity, what the cluster can grow to, storage checks), worker (Ray Train's worker entry
point), fit (TorchTrainer runs and in-process trials), study, trials and study_console (Ray Tune), search
(the searchers), results, history (Tune's history callback and ASHA's replay), stream and decode (Ray
Data), metrics, status, measure (the test split on the cluster), failures and cluster_file.
"""
