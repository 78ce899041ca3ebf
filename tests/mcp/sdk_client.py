"""Drives `homelab-deploy mcp` with the official MCP Python SDK, which checks every result's
structuredContent against the tool's outputSchema (it raises on a mismatch).

Usage: sdk_client.py BIN NATS_URL REQUEST_ID. Prints one JSON object: per tool call, whether it
was an error and the sizes of its text and structuredContent; the progress seen during a build.
"""

import asyncio
import json
import sys

from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client


async def main(binary: str, nats_url: str, request_id: str) -> None:
    params = StdioServerParameters(
        command=binary, args=["mcp", "--enable-builds", "--nats-url", nats_url]
    )
    report = {"calls": {}, "tools": {}, "progress": []}
    async with stdio_client(params) as (read, write):
        async with ClientSession(read, write) as session:
            await session.initialize()
            listed = await session.list_tools()
            for tool in listed.tools:
                report["tools"][tool.name] = tool.model_dump(mode="json", by_alias=True, exclude_none=True)

            async def progress(value, total, message):
                report["progress"].append([value, total, message])

            calls = [
                ("list_repos_and_hosts", {}),
                ("list_builders", {}),
                ("list_builds", {"state": "failed", "limit": 100}),
                ("build_status", {"id": request_id}),
                ("build_logs", {"id": request_id, "host": "host000"}),
                ("build", {"repo": "demo", "target": "all", "wait_secs": 120}),
            ]
            for name, arguments in calls:
                callback = progress if name == "build" else None
                # The SDK validates structuredContent against the outputSchema here.
                result = await session.call_tool(name, arguments, progress_callback=callback)
                text = "".join(c.text for c in result.content if c.type == "text")
                report["calls"][name] = {
                    "is_error": bool(result.is_error),
                    "text": text,
                    "text_bytes": len(text.encode()),
                    "structured_bytes": len(json.dumps(result.structured_content or {}).encode()),
                    "structured": result.structured_content,
                }
    print(json.dumps(report))


if __name__ == "__main__":
    asyncio.run(main(*sys.argv[1:4]))
