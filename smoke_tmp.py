import asyncio, time
from adapters.asyncio_host import AsyncioHost
from adapters.llm.bridge import AsyncioOrchestratorBridge
from adapters.llm.openai_chat import OpenAIChatOrchestrator
from kernel import AgentRequest, ContextBundle, SystemHaltedError
from tests.support.fake_openai import FakeOpenAIServer

async def main(server):
    topic = ContextBundle("t", "x")
    reqs = [AgentRequest(f"a{i}", topic) for i in range(72)]
    llm = OpenAIChatOrchestrator(server.base_url, "m", timeout_s=30, max_retries=0)
    async with AsyncioHost(AsyncioOrchestratorBridge(llm)) as host:
        r = await host.invoke_concurrent(reqs)
        print("ok", r.success_count, r.failures[:1])
        server.default = "hang"
        d = host.start(reqs)
        ok = await asyncio.to_thread(server.wait_for, lambda s: s.in_flight >= 72, 10)
        print("inflight", ok, server.in_flight)
        t = time.perf_counter()
        host.halt("stop")
        try:
            await d.result()
        except SystemHaltedError as e:
            print("halted", e.partial.failure_count, time.perf_counter() - t)
        ok = await asyncio.to_thread(server.wait_for, lambda s: s.disconnects >= 72, 10)
        print("disconnects", server.disconnects, time.perf_counter() - t)
server = FakeOpenAIServer().start()
asyncio.run(main(server))
server.stop()
