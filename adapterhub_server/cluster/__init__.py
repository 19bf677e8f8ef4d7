"""Serving on a Ray Serve cluster: engine replicas behind an adapter-affinity router.

`ray_app` holds the deployments and the application builder; `routing` maps a request to
the multiplexed model id (the resolved adapter version) Ray Serve routes it by. Ray is
imported only by `ray_app`, so the rest of the server never needs it.
"""
