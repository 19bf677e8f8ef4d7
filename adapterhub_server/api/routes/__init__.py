"""HTTP routes. Each one fetches the service from app state, calls one method, returns."""
