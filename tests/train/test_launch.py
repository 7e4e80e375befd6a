"""The embedded local Ray's processes ask its own dashboard for Ray's state API (launch.own_dashboard), so that
Ray Train's placement-group cleaner never takes its controller for dead by asking another cluster on the host.
Why that address wins: test_ray_state_api_address_comes_from_the_environment_first (tests/benchmarks).
"""

import os

import ray


@ray.remote(num_cpus=0)
class Alive:
    def ping(self) -> bool:
        return True


@ray.remote(num_cpus=0)
def state_api_view(actor_id: str) -> tuple[str, str | None]:
    from ray.util.state import get_actor

    found = get_actor(actor_id, timeout=10)
    return os.environ.get("RAY_API_SERVER_ADDRESS", ""), found.state if found else None


def test_the_session_rays_processes_ask_its_own_dashboard(ray_local):
    # the session's Ray is started with launch.own_dashboard, as the jobs' embedded Ray and the train benchmark's
    actor = Alive.remote()
    assert ray.get(actor.ping.remote())
    address, state = ray.get(state_api_view.remote(actor._actor_id.hex()))
    assert address.startswith("http://127.0.0.1:") and state == "ALIVE"  # found there: this cluster's state API
