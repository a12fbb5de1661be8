#!/usr/bin/env python3
"""The same job as bulkcall's benchmark, written the way a careful Python
user would: asyncio + aiohttp, one session, 64 workers, the token fetched
once, every answer parsed and written to results.jsonl.

    aiohttp_baseline.py BASE_URL ROWS.csv OUT.jsonl [CONCURRENCY]

Prints rows/s. Not part of bulkcall; a yardstick for bench/run.
"""
import asyncio
import csv
import json
import sys
import time

import aiohttp


async def main(base, rows_path, out_path, concurrency):
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        async with session.post(
            f"{base}/apip/auth/sntl/v1/token",
            json={"client_id": "bench", "client_secret": "bench", "grant_type": "client_credentials"},
        ) as r:
            token = (await r.json())["access_token"]
        headers = {"Authorization": f"Bearer {token}"}
        queue = asyncio.Queue(maxsize=concurrency * 4)
        out = open(out_path, "w")
        done = 0

        async def worker():
            nonlocal done
            while True:
                row = await queue.get()
                if row is None:
                    return
                body = {
                    "controlNumber": row["control_number"],
                    "tradingPartnerServiceId": row["payer_id"],
                    "provider": {"organizationName": row["provider_name"], "npi": row["npi"]},
                    "subscriber": {
                        "memberId": row["member_id"],
                        "firstName": row["first_name"],
                        "lastName": row["last_name"],
                        "dateOfBirth": row["dob"],
                    },
                    "encounter": {"serviceTypeCodes": [row["service_type"]]},
                }
                try:
                    async with session.post(
                        f"{base}/medicalnetwork/eligibility/v3",
                        json=body,
                        headers={**headers, "x-request-id": f"elig-{row['control_number']}"},
                    ) as r:
                        answer = await r.json(content_type=None)
                        line = {"key": row["control_number"], "status": r.status, "response": answer}
                        line["capture"] = {"plan_status": answer["planStatus"][0]["status"]}
                except Exception as e:  # a failed row is recorded, not fatal
                    line = {"key": row["control_number"], "error": repr(e)}
                out.write(json.dumps(line) + "\n")
                done += 1

        started = time.monotonic()
        workers = [asyncio.create_task(worker()) for _ in range(concurrency)]
        with open(rows_path, newline="") as f:
            for row in csv.DictReader(f):
                await queue.put(row)
        for _ in workers:
            await queue.put(None)
        await asyncio.gather(*workers)
        took = time.monotonic() - started
        out.close()
        print(f"{done / took:.1f} rows/s ({done} rows in {took:.2f} s)")


if __name__ == "__main__":
    base, rows, out = sys.argv[1:4]
    concurrency = int(sys.argv[4]) if len(sys.argv) > 4 else 64
    asyncio.run(main(base, rows, out, concurrency))
