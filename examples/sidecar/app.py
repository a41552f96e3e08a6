"""Example app for the sidecar pattern: an asyncpg pool on DATABASE_URL (which the entrypoint points at pgbudget).

It runs a few concurrent workers that use prepared statements (asyncpg's default statement cache) until SIGTERM,
then closes its pool and exits 0. Each second it prints one line: `queries=<n> port=<port of DATABASE_URL>`.
"""

import asyncio
import os
import signal
import sys
import urllib.parse

import asyncpg


async def worker(pool: asyncpg.Pool, stop: asyncio.Event, counter: list) -> None:
    while not stop.is_set():
        sent = counter[0]
        async with pool.acquire() as conn:
            async with conn.transaction():
                n = await conn.fetchval("SELECT $1::int + 1", sent)
                assert n == sent + 1, (n, sent)
        counter[0] += 1
        await asyncio.sleep(0.01)


async def main() -> int:
    url = os.environ["DATABASE_URL"]
    port = urllib.parse.urlsplit(url).port
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    pool = await asyncpg.create_pool(url, min_size=2, max_size=4, server_settings={"application_name": "sidecar-app"})
    counter = [0]
    tasks = [asyncio.create_task(worker(pool, stop, counter)) for _ in range(4)]
    while not stop.is_set():
        print(f"queries={counter[0]} port={port}", flush=True)
        try:
            await asyncio.wait_for(stop.wait(), timeout=1)
        except asyncio.TimeoutError:
            pass
    await asyncio.gather(*tasks)
    await pool.close()
    print(f"closed queries={counter[0]}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
