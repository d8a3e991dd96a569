// The official `openai` npm package against sluice, unchanged but for baseURL.
// Prints one JSON object with what it saw; tests/test_openai_node.py checks it.
import OpenAI from "openai";

const client = new OpenAI({ baseURL: process.env.SLUICE_BASE_URL, apiKey: "unused" });
const messages = [{ role: "user", content: "hello from node" }];
const seen = {};

const models = await client.models.list();
seen.models = models.data.map((m) => m.id);

const stream = await client.chat.completions.create({
  model: seen.models[0],
  messages,
  stream: true,
  stream_options: { include_usage: true },
});
let text = "";
let finish = null;
for await (const chunk of stream) {
  if (chunk.choices.length) {
    text += chunk.choices[0].delta.content ?? "";
    finish = chunk.choices[0].finish_reason ?? finish;
  } else {
    seen.usage = chunk.usage;
  }
}
seen.streamed = { text, finish };

const completion = await client.chat.completions.create({
  model: seen.models[0],
  messages,
  max_tokens: 4,
});
seen.collected = completion.choices[0].message.content;

try {
  await client.chat.completions.create({ model: "no-such-model", messages });
} catch (err) {
  seen.error = { name: err.constructor.name, status: err.status, code: err.code };
}

console.log(JSON.stringify(seen));
