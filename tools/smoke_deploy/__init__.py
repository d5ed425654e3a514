"""`make smoke-deploy`: the chart's minimal install, run with `podman kube play` and talked to.

`kube_play` turns the rendered objects into what podman 4.3 can play on one host
(pure: tested in tests/tools); `podman` drives podman and buildah; `checks` talks to
the running pods from outside; `__main__` puts it together and always tears down.
"""
