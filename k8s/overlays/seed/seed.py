"""Train each named built-in scenario and publish it as the first version of the policy of the
same name on the Kafka-backed registry; skip policies the topic already holds.

Usage: python seed.py BOOTSTRAP TOPIC POLICY... (run in the trainer image, from a writable
working directory).
"""

import sys

from policyloop.cli import main
from policyloop.registry.kafka import KafkaRegistry
from policyloop.registry.local import LocalRegistry

bootstrap, topic, policies = sys.argv[1], sys.argv[2], sys.argv[3:]
target = KafkaRegistry(bootstrap, "models-cache", topic=topic)
try:
    held = set(target.policies())
    for policy in policies:
        if policy in held:
            print(f"{policy}: already on topic {topic}, left alone", flush=True)
            continue
        if main(["train", "--scenario", policy, "--policy", policy, "--registry", "trained"]):
            sys.exit(f"{policy}: training failed")
        version = LocalRegistry("trained").current(policy)
        published = target.publish(policy, version.read_model(), version.manifest,
                                   {"head.npz": version.read_file("head.npz")})
        print(f"{policy}: version {published.version} is current on topic {topic}", flush=True)
finally:
    target.close()
