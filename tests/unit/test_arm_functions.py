"""ARM template functions as ARM defines them, evaluated where a real wrapper has them: in an imageTemplates
resource. Hash values are ones ARM itself produced, as published by others."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from workflows.template import DeploymentContext, TemplateError, resolve_arm_wrapper

SUBSCRIPTION = "00000000-0000-0000-0000-000000000000"
CONTEXT = DeploymentContext(subscription_id=SUBSCRIPTION, resource_group="images-rg", location="westeurope")


def wrapper(value: object, **resource: object) -> dict:
    """An ARM template whose image template carries `value` as its one tag (the rest is never evaluated)."""
    return {
        "$schema": "https://schema.management.azure.com/schemas/2019-04-01/deploymentTemplate.json#",
        "parameters": {"flag": {"type": "bool", "defaultValue": True}, "empty": {"type": "string", "defaultValue": ""}},
        "variables": {
            "base": "https://example.org/firstpath/azuredeploy.json",
            "object": {"valueA": 10, "valueB": "Example Text"},
        },
        "resources": [
            {
                "type": "Microsoft.VirtualMachineImages/imageTemplates",
                "apiVersion": "2024-02-01",
                "name": "t",
                "tags": {"value": value},
                **resource,
            }
        ],
    }


def evaluated(expression: str, deployment: DeploymentContext = CONTEXT, **resource: object) -> Any:
    body, _ = resolve_arm_wrapper(wrapper(f"[{expression}]", **resource), deployment=deployment)
    return body["tags"]["value"]


def refused(expression: str, deployment: DeploymentContext = CONTEXT) -> str:
    with pytest.raises(TemplateError) as caught:
        evaluated(expression, deployment)
    [issue] = caught.value.issues
    assert issue.path == "resources[0].tags.value"
    assert issue.message.startswith(f"Cannot resolve [{expression}]: ")
    return issue.message


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        # Published by Azure/terraform-provider-azapi (its unique_string test).
        (f"uniqueString('/subscriptions/{SUBSCRIPTION}', 'resource-id')", "cwvxuqg24sifi"),
        # An ARM deployment's own output, published in a test of Azure Marketplace tooling.
        (
            "uniqueString('/subscriptions/31e9f9a0-9fd2-4294-a0a3-0101246d9700/resourceGroups/rg-modm201-20230913120256"
            "/providers/Microsoft.Compute/virtualMachines/bobjacmodm201')",
            "yvjxno3je5on2",
        ),
        # Published by a Terraform provider that reproduces ARM's guid().
        ("guid('test')", "d6a5baf1-8b9b-542a-8525-2982f1f98a0c"),
        ("GUID('test')", "d6a5baf1-8b9b-542a-8525-2982f1f98a0c"),  # function names in any case
    ],
)
def test_guid_and_unique_string_hash_as_arm_does(expression: str, value: str) -> None:
    assert evaluated(expression) == value


def test_guid_joins_its_arguments_with_a_hyphen() -> None:
    joined = evaluated("guid('a', 'b')")
    assert joined == evaluated("guid('a-b')") != evaluated("guid('ab')")
    assert uuid.UUID(joined).version == 5


@pytest.mark.parametrize(
    ("expression", "value"),
    [
        # ARM's documented examples.
        (
            "format('{0}, {1}. Formatted number: {2:N0}', 'Hello', 'User', 8175133)",
            "Hello, User. Formatted number: 8,175,133",
        ),
        ("format('{{{0}}} {1,4}|{2:D3}', 'x', 'ab', 7)", "{x}   ab|007"),
        ("uri('http://contoso.org/firstpath', 'myscript.sh')", "http://contoso.org/myscript.sh"),
        ("uri('http://contoso.org/firstpath/', 'myscript.sh')", "http://contoso.org/firstpath/myscript.sh"),
        ("uri(variables('base'), 'myscript.sh')", "https://example.org/firstpath/myscript.sh"),
        (
            "uri('http://contoso.org/firstpath/azuredeploy.json/', 'myscript.sh')",
            "http://contoso.org/firstpath/azuredeploy.json/myscript.sh",
        ),
        ("uri('http://contoso.org/a/', '/b.sh')", "http://contoso.org/a/b.sh"),
        ("toLower('Debian-12')", "debian-12"),
        ("toUpper('westeurope')", "WESTEUROPE"),
        ("replace('1.2.3', '.', '-')", "1-2-3"),
        # .NET writes booleans as True and False, and ARM's string() and concat() with them.
        ("string(parameters('flag'))", "True"),
        ("concat('debug=', parameters('flag'))", "debug=True"),
        ("string(variables('object'))", '{"valueA":10,"valueB":"Example Text"}'),
        ("string(1)", "1"),
        ("int('42')", 42),
        ("bool('FALSE')", False),
        ("bool(1)", True),
        ("empty(parameters('empty'))", True),
        ("empty('x')", False),
        ("coalesce(null(), null(), 'third')", "third"),
        ("if(parameters('flag'), 'yes', parameters('undeclared'))", "yes"),  # the branch not taken is never evaluated
        ("if(not(parameters('flag')), 'yes', 'no')", "no"),
        ("equals(int('1'), 1)", True),
        ("equals(true(), 1)", False),
        ("and(true(), or(false(), parameters('flag')))", True),
        ("resourceGroup().location", "westeurope"),
        ("resourceGroup().name", "images-rg"),
        ("resourceGroup().id", f"/subscriptions/{SUBSCRIPTION}/resourceGroups/images-rg"),
        ("subscription().subscriptionId", SUBSCRIPTION),
        ("subscription().id", f"/subscriptions/{SUBSCRIPTION}"),
        (
            "resourceId('Microsoft.Compute/galleries/images', 'golden', 'debian12')",
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/images-rg/providers/Microsoft.Compute/galleries/golden/images/debian12",
        ),
        (
            "resourceId('other-rg', 'Microsoft.Compute/images', 'base')",
            f"/subscriptions/{SUBSCRIPTION}/resourceGroups/other-rg/providers/Microsoft.Compute/images/base",
        ),
        (
            "resourceId('1111', 'other-rg', 'Microsoft.Compute/images', 'base')",
            "/subscriptions/1111/resourceGroups/other-rg/providers/Microsoft.Compute/images/base",
        ),
        (
            "subscriptionResourceId('Microsoft.Authorization/roleDefinitions', 'acdd72a7')",
            f"/subscriptions/{SUBSCRIPTION}/providers/Microsoft.Authorization/roleDefinitions/acdd72a7",
        ),
    ],
)
def test_functions_return_what_arm_returns(expression: str, value: Any) -> None:
    assert evaluated(expression) == value


@pytest.mark.parametrize(
    ("expression", "missing"),
    [
        ("resourceGroup().location", "resourceGroup().location needs the resource group's region: give --location"),
        ("resourceGroup().name", "give --resource-group"),
        ("resourceGroup().id", "give --subscription and --resource-group"),
        ("subscription().subscriptionId", "give --subscription"),
        (
            "resourceId('Microsoft.Compute/images', 'base')",
            "resourceId() needs the deployment's subscription and resource group",
        ),
        (
            "resourceId('rg', 'Microsoft.Compute/images', 'base')",
            "resourceId() needs the deployment's subscription: give --subscription",
        ),
    ],
)
def test_a_missing_deployment_context_is_named_with_its_option(expression: str, missing: str) -> None:
    assert missing in refused(expression, DeploymentContext())


@pytest.mark.parametrize(
    ("expression", "why"),
    [
        ("resourceId('Microsoft.Compute/galleries/images', 'golden')", "needs 2 name(s), not 1"),
        ("format('{1}', 'only one')", "{1} has no value"),
        ("int('4.5')", "int() takes a whole number"),
        ("if('yes', 1, 2)", "a condition of true or false"),
        ("subscription().tenantId", "kiln knows only id, subscriptionId of subscription()"),
        ("reference('x').id", "function 'reference' is not supported"),
        ("copyIndex()", "copyIndex() is used outside a copy loop"),
    ],
)
def test_what_cannot_be_evaluated_says_why(expression: str, why: str) -> None:
    assert why in refused(expression)


def test_copy_index_counts_in_a_copy_loop_of_one() -> None:
    copy = {"name": "templates", "count": 1}
    assert evaluated("copyIndex('templates', 5)", copy=copy) == 5
    assert evaluated("copyIndex()", copy=copy) == 0
