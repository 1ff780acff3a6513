"""The Xen driver: domains as xl.cfg files, every verb an xl command in dom0.

The command runner is injected (Ganeti's _run_cmd_fn idea): the same driver
runs on a real dom0 (a local subprocess runner) and in the lab (a runner that
reaches a nested Xen's dom0 over its command channel).
"""
