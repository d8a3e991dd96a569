// The Vercel AI SDK (`ai` + `@ai-sdk/openai`, zod schemas) against sluice, over Chat Completions
// and the Responses API: `streamText` with a tool it must call, and `generateObject`.
// Prints one JSON object with what it saw; tests/test_tools_frameworks.py checks it.
import { createOpenAI } from "@ai-sdk/openai";
import { generateObject, streamText, tool } from "ai";
import { z } from "zod";

globalThis.AI_SDK_LOG_WARNINGS = false; // generateObject is deprecated for generateText + output
const provider = createOpenAI({ baseURL: process.env.SLUICE_BASE_URL, apiKey: "unused" });
const modelName = process.env.SLUICE_MODEL;
const getWeather = tool({
  description: "The current weather in a city",
  inputSchema: z.object({ city: z.enum(["Paris", "London", "Tokyo"]) }),
});
const pet = z.object({
  kind: z.enum(["cat", "dog", "fish"]),
  legs: z.number(),
  friendly: z.boolean(),
});

async function run(model) {
  const streamed = streamText({
    model,
    prompt: "What is the weather in Paris?",
    tools: { get_weather: getWeather },
    toolChoice: "required",
    maxOutputTokens: 40,
    temperature: 0,
  });
  const parts = [];
  for await (const part of streamed.fullStream) {
    parts.push(part.type);
    if (part.type === "error") parts.push(String(part.error));
  }
  const calls = (await streamed.toolCalls).map((c) => ({ name: c.toolName, input: c.input }));
  const { object } = await generateObject({
    model,
    schema: pet,
    prompt: "Describe a pet as JSON.",
    maxOutputTokens: 60,
    temperature: 0,
  });
  return { parts, calls, finish: await streamed.finishReason, object };
}

const seen = {
  chat: await run(provider.chat(modelName)),
  responses: await run(provider.responses(modelName)),
};
console.log(JSON.stringify(seen));
